"""The single-process peers of the headline benchmark, each run in a fresh process.

    python -m benchmarks.headline.peers SPEC.json OUT.json

``SPEC`` is written by ``bench.py``: ``{"task": "single" | "profile", "overrides": [...],
"threads": T, "warmup": W, "steps": N}``, and for a profile ``"rules", "partition", "glob"``.
A fresh process per measurement keeps its peak RSS its own. Batches are built before the clock
starts (pipelocal's stage 0 builds its own inside its timing: a small cost next to a step).

* ``single``: (a) backprop (``rule.name = glob``) or (b) sequential local learning, the whole
  model in one :class:`pipelocal.engine.Engine`; samples/s over N steps after W warm-up steps;
  then one more step under a :class:`memory.SavedTensorMeter` for the activation peak; and
  the minor page faults per timed step.
* ``profile``: for each local rule, each stage's blocks timed ALONE (an engine over that
  stage's blocks only, inputs made beforehand by the blocks before it) with per-block times,
  saved-for-backward and state bytes; and each block's share of a backprop step, timed alone
  on a random output gradient (computing its input's gradient, as backprop does for every
  block but the first), on the batch and (``"glob_rows"``) on micro-batches of those rows,
  with its optimiser step's part of it (``glob_opt_s``: once per batch under pipelining).
  The ideal of (c) and the scaling model's cost table.
* ``concurrent`` (``"partition", "stage", "barrier", "duration_s"``): one stage's blocks on
  prepared inputs, timed for ``duration_s`` while the other stages' processes (started at the
  same time by ``bench.py``) do the same; the concurrent ideal of (c).
* ``micro_memory`` (``"micro_batches": [M, ...]``): for each M, each block's
  saved-for-backward peak while it trains one batch in M micro-batches (an engine over that
  block alone, ``micro_batches = M``, inputs made by the blocks before it, each micro-batch in
  a buffer of its own as a stage receives it), its state bytes and the bytes of its wire
  message (the largest micro-batch's rows).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.headline.memory import SavedTensorMeter, peak_rss_mib, state_bytes
from pipelocal.config import Config, load_config
from pipelocal.data import load_dataset, make_loaders
from pipelocal.device import bind_stage
from pipelocal.engine import Engine, LocalBlock, build_blocks, piece_rows
from pipelocal.microbatch import split_batch
from pipelocal.models import build_model

__all__ = ["bind_like_a_stage", "build_all", "concurrent_stage", "micro_memory", "profile",
           "single_device"]

Batch = tuple[Tensor, Tensor]


def build_all(cfg: Config) -> tuple[list[LocalBlock], list[Batch]]:
    """Every block of the model and enough training batches for a run (cycled if few)."""
    dataset = load_dataset(cfg.data)
    specs = build_model(cfg.model, dataset.in_shape, dataset.num_classes)
    blocks = build_blocks(cfg, specs, dataset.num_classes, range(len(specs)), "cpu")
    train_loader, _ = make_loaders(dataset, cfg.data, cfg.run.seed)
    batches = [train_loader.batch(0, i) for i in range(train_loader.num_batches(0))]
    # Full batches only: a short last batch would change the per-step cost.
    return blocks, [b for b in batches if len(b[1]) == cfg.data.batch_size]


def bind_like_a_stage(cfg: Config, local_rank: int, local_world: int, threads: int) -> None:
    """Bind this process to the cores pipelocal gives stage process ``local_rank`` of
    ``local_world`` on one node (none when ``pipeline.bind_cpus`` is off or they do not fit)."""
    if cfg.pipeline.bind_cpus:
        bind_stage(local_rank, local_world, threads)


def _cycle(batches: list[Batch], n: int) -> list[Batch]:
    return [batches[i % len(batches)] for i in range(n)]


def single_device(cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    blocks, batches = build_all(cfg)
    engine = Engine(blocks)
    for x, y in _cycle(batches, warmup):
        engine.train_batch(x, y, 0)
    timed = _cycle(batches[warmup:] or batches, steps)
    step_s = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for x, y in timed:
        t0 = time.perf_counter()
        engine.train_batch(x, y, 0)
        step_s.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with SavedTensorMeter(blocks) as meter:
        engine.train_batch(*batches[0], 0)
    n = cfg.data.batch_size * steps
    return {
        "throughput(samples/s)": n / sum(step_s),
        "step(s)": step_s,
        "minor_faults/step": faults / steps,
        "activation_peak(B)": meter.peak,
        **state_bytes(blocks, [b.optimizer for b in blocks]),
        "peak_rss(MiB)": peak_rss_mib(),
    }


def _glob_block_step(block: LocalBlock, x: Tensor, y: Tensor) -> float:
    """One block's part of a backprop step on input x: forward, backward (with the gradient
    of its input, which backprop passes to the block before it, for every block but the
    first), optimiser step. Returns the optimiser step's seconds."""
    block.train(True)
    if block.index > 0:
        x = x.detach().requires_grad_(True)
    out = block.pass_on(block.body(x))
    block.optimizer.zero_grad(set_to_none=True)
    if block.is_output:
        F.cross_entropy(out, y).backward()
    else:
        # The gradient arriving from the blocks after it: same size as what it passes on.
        out.backward(torch.ones_like(out) / out.numel())
    t0 = time.perf_counter()
    block.optimizer.step()
    return time.perf_counter() - t0


def _glob_saved_bytes(blocks: list[LocalBlock], x: Tensor) -> list[int]:
    """Bytes each block's forward adds to what one end-to-end forward holds for backward.

    Measured in one graph, so a tensor saved by two blocks (one's output, the next one's
    input) counts once, for the first.
    """
    added = []
    with SavedTensorMeter(blocks) as meter:
        for block in blocks:
            before = meter.live
            x = block.pass_on(block.body(x))
            added.append(meter.live - before)
    return added


def _profile_glob(cfg: Config, warmup: int, steps: int,
                  rows: int | None = None) -> list[dict[str, Any]]:
    """Each block's share of a backprop step on the batch (or its first ``rows`` rows: a
    micro-batch of torch's pipelining)."""
    blocks, batches = build_all(cfg.replace(rule={"name": "glob"}))
    if rows is not None:
        batches = [(x[:rows], y[:rows]) for x, y in batches]
    data = _cycle(batches, warmup + steps)
    out = []
    for block in blocks:
        times, opt_times = [], []
        for j, (x, y) in enumerate(data):
            t0 = time.perf_counter()
            opt_s = _glob_block_step(block, x, y)
            if j >= warmup:
                times.append(time.perf_counter() - t0)
                opt_times.append(opt_s)
        with torch.no_grad():  # this block's output: the next block's inputs
            data = [(block.pass_on(block.body(x)), y) for x, y in data]
        out.append({
            "glob_s": _median(times),
            "glob_opt_s": _median(opt_times),
            "state_glob_bytes": sum(state_bytes([block], [block.optimizer]).values()),
        })
    for row, saved in zip(out, _glob_saved_bytes(blocks, batches[0][0])):
        row["saved_glob_bytes"] = saved
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def concurrent_stage(cfg: Config, partition: list[int], stage: int, warmup: int,
                     steps: int, barrier: Path, duration_s: float) -> dict[str, Any]:
    """Stage ``stage``'s blocks on prepared inputs, timed while the other stages' processes do
    the same: every process prepares, then waits for all (``barrier``: a ready file each), then
    trains for ``duration_s`` seconds, so that all of them compute for the whole window.
    No communication, no loader: the compute the machine allows S processes at once. Each
    process is bound to cores as the pipeline's stage would be (``pipeline.bind_cpus``)."""
    bind_like_a_stage(cfg, stage, len(partition), torch.get_num_threads())
    blocks, batches = build_all(cfg)
    data = _cycle(batches, warmup + steps)
    start = sum(partition[:stage])
    for block in blocks[:start]:  # the stage's inputs: the blocks before it, training as they go
        data = [(block.train_step(x, y), y) for x, y in data]
    stage_blocks = blocks[start:start + partition[stage]]
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready-{stage}").write_text(str(time.time()))
    deadline = time.monotonic() + 600.0
    while len(list(barrier.glob("ready-*"))) < len(partition):
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {stage}: the other stages' processes never got ready")
        time.sleep(0.005)
    t_end = time.monotonic() + duration_s
    step_s: list[float] = []
    i = 0
    while time.monotonic() < t_end or len(step_s) < 3:
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        for block in stage_blocks:
            x = block.train_step(x, y)
        if i >= warmup:
            step_s.append(time.perf_counter() - t0)
        i += 1
    return {"stage": stage, "step_mean(s)": sum(step_s) / len(step_s),
            "step_median(s)": _median(step_s), "steps": len(step_s)}


def _profile_local(cfg: Config, partition: list[int], warmup: int,
                   steps: int) -> dict[str, Any]:
    blocks, batches = build_all(cfg)
    data = _cycle(batches, warmup + steps)
    stage_s: list[float] = []
    per_block: list[dict[str, Any]] = []
    start = 0
    for size in partition:
        stage = blocks[start:start + size]
        start += size
        step_s, block_s = [], [[] for _ in stage]
        meter = SavedTensorMeter(blocks)
        peaks = [0] * len(stage)
        outputs = []
        with meter:
            for j, (x, y) in enumerate(data):
                t0 = time.perf_counter()
                h = x
                for b, block in enumerate(stage):
                    tb = time.perf_counter()
                    meter.reset_peak()
                    h = block.train_step(h, y)
                    peaks[b] = max(peaks[b], meter.peak)
                    if j >= warmup:
                        block_s[b].append(time.perf_counter() - tb)
                if j >= warmup:
                    step_s.append(time.perf_counter() - t0)
                outputs.append((h, y))
        data = outputs  # this stage's outputs are the next stage's inputs
        stage_s.append(_median(step_s))
        for b, block in enumerate(stage):
            per_block.append({
                "name": block.spec.name,
                "local_s": _median(block_s[b]),
                "saved_local_bytes": peaks[b],
                "state_local_bytes": sum(state_bytes([block], [block.optimizer]).values()),
                "wire_bytes": cfg.data.batch_size * 4 * _prod(block.spec.wire_shape),
            })
    return {"stage_alone(s)": stage_s, "blocks": per_block}


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def micro_memory(cfg: Config, micro_batches: list[int]) -> dict[str, Any]:
    """{M: {"blocks": [...]}} in the form of a profile's blocks (analysis reads either)."""
    out = {}
    for m in micro_batches:
        mcfg = cfg.replace(pipeline={"micro_batches": m})
        blocks, batches = build_all(mcfg)
        (h, y), rows = batches[0], piece_rows(mcfg)
        rows_out = []
        with SavedTensorMeter(blocks) as meter:
            for block in blocks:
                engine, outs = Engine([block], micro_batches=m), []
                meter.reset_peak()
                for part, (px, py) in split_batch((h, y), m):
                    assert px is not None and py is not None
                    outs.append(engine.train_micro(px.clone(), py, 0, part=part))
                h = torch.cat(outs)
                rows_out.append({
                    "name": block.spec.name,
                    "saved_local_bytes": meter.peak,
                    "state_local_bytes": sum(state_bytes([block], [block.optimizer]).values()),
                    "wire_bytes": rows * 4 * _prod(block.spec.wire_shape),
                })
        out[str(m)] = {"blocks": rows_out}
    return out


def profile(cfg: Config, rules: list[str], partition: list[int], warmup: int,
            steps: int, glob: bool, glob_rows: list[int] | None = None) -> dict[str, Any]:
    """Stage-alone times per rule, and (``glob``) each block's share of a backprop step, on
    the batch and on each of ``glob_rows`` rows."""
    out: dict[str, Any] = {"rules": {}}
    for rule in rules:
        out["rules"][rule] = _profile_local(cfg.replace(rule={"name": rule}), partition,
                                            warmup, steps)
    if glob:
        out["glob_blocks"] = _profile_glob(cfg, warmup, steps)
        out["glob_blocks_at"] = {str(r): _profile_glob(cfg, warmup, steps, rows=r)
                                 for r in glob_rows or []}
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, spec["overrides"])
    if spec["task"] == "single":
        result = single_device(cfg, spec["warmup"], spec["steps"])
    elif spec["task"] == "micro_memory":
        result = micro_memory(cfg, spec["micro_batches"])
    elif spec["task"] == "concurrent":
        result = concurrent_stage(cfg, spec["partition"], spec["stage"], spec["warmup"],
                                  spec["steps"], Path(spec["barrier"]), spec["duration_s"])
    else:
        result = profile(cfg, spec["rules"], spec["partition"], spec["warmup"], spec["steps"],
                         spec["glob"], spec.get("glob_rows"))
    result["threads"] = torch.get_num_threads()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
