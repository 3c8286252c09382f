"""The headline benchmark: pipelocal against single-device backprop and torch's own pipelining.

For each model (same data, batch size, Adam, and ``--threads-per-stage`` torch threads in every
process), in one invocation, with the peers interleaved within each repeat so that machine
noise hits them alike:

    (a) single-device end-to-end backprop (rule glob)                  peers.py, fresh process
    (b) single-device sequential local learning, per rule (pred, predsim)   peers.py
    (c) pipelocal with S stages, per rule: ``python -m pipelocal train --stages S`` (the CLI),
        read back from ``<run_dir>/metrics.jsonl``; its first epoch is warm-up, the second
        is measured (``throughput(samples/s)`` = samples / ``time/epoch(s)``)
    (d) backprop pipelined by torch.distributed.pipelining over the same split: ScheduleGPipe
        and Schedule1F1B, micro-batches 2S, 4S, 8S swept in the first repeat, the best of each
        schedule in the others                                         torchpipe.py
    ideals of (c): each stage's blocks timed ALONE in a fresh process    peers.py profile
        and all stages computing AT ONCE on prepared inputs (concurrent)  peers.py concurrent

(c) gets a split per rule, (d) one balanced on backprop's per-block costs. Then the memory
figures (memory.py), where each stage's time goes, the transport against a plain copy and the
scaling model (scaling.py) for S = 1..16 checked against the measured S, from the blocks'
costs alone and with the measured contention. Time to accuracy is its own benchmark
(``python -m benchmarks tta``). Writes ``<name>.json``,
``<name>.md`` to ``--out-dir`` (default benchmarks/results) and ``<name>.png`` beside them (for the
default, to docs/img/, where the docs show it).

The committed headline result (2-core CPU; see the JSON for the machine and its load):

    python -m benchmarks bench

A smoke test (tiny models, one model, writes to /tmp; a few minutes on an idle 2-core CPU):

    python -m benchmarks bench --quick --models mlp --repeats 2 --out-dir /tmp/bench

Micro-batches (``--micro-batches``): instead of the peers above, (c) with
``pipeline.micro_batches = M`` for each M listed, per rule whose loss is a mean over samples,
beside (d) 1F1B at its best micro-batch count, same batch, split and threads; memory per
device from each block's saved-for-backward peak at M (peers.py micro_memory) plus the
in-flight messages and state, and each stage's peak RSS. Writes ``bench_micro.json`` and
``.md``:

    python -m benchmarks bench --micro-batches 1,2,4,8 --rules pred
    python -m benchmarks bench --micro-batches 1,2 --rules pred --quick --models mlp \
        --repeats 1 --out-dir /tmp/bench     # smoke test, one or two minutes

CPU only: every peer runs on the CPU (gloo, torch threads per process); there is no GPU path
yet (``memory.gpu_memory`` holds the CUDA / NVML read-out for it, not exercised here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DOCS_IMG_DIR,
    MNIST_10K_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    Provenance,
    read_metrics,
    read_run_config,
    require_mnist_10k,
    write_result,
)
from pipelocal.config import Config, load_config
from pipelocal.hostmem import keep_host_memory

__all__ = ["PRESETS", "Preset", "main"]



@dataclass(frozen=True, kw_only=True)
class Preset:
    """One benchmarked model and how long each peer runs on it."""

    label: str
    overrides: tuple[str, ...]
    warmup: int
    """Untimed steps before the timed ones (single-device peers, torch pipelining, profile)."""
    steps: int
    """Timed steps per measurement."""
    pipe_batches: int
    """Batches in each pipelocal epoch (data.train_limit = this x batch size). Pipeline fill
    and drain happen once per epoch and count against it."""
    pipe_epochs: int = 2
    """(c)'s epochs per run: the first is a warm-up; its figures are the measured epoch of
    median throughput, its efficiency in the stages the median over the measured epochs."""
    concurrent_s: float = 4.0
    """Seconds each stage computes in the concurrent ideal (all stages at once)."""
    ideal_steps: int = 0
    """(c)'s ``pipeline.ideal_steps``: steps of the concurrent ideal measured in the stage
    processes after each epoch (the first a warm-up); 0 = not measured."""


PRESETS: dict[str, Preset] = {
    "mlp": Preset(
        label="MLP 4x1024",
        overrides=("model.name=mlp", "model.hidden=1024", "model.depth=4"),
        warmup=3, steps=20, pipe_batches=62, pipe_epochs=6, concurrent_s=4.0, ideal_steps=41,
    ),
    "vgg8b": Preset(
        label="VGG8B width 0.25",
        overrides=("model.name=vgg8b", "model.width=0.25"),
        warmup=2, steps=6, pipe_batches=62, pipe_epochs=4, concurrent_s=8.0, ideal_steps=11,
    ),
}
QUICK = {  # --quick: tiny sizes to test the whole command
    "mlp": ("model.hidden=64", "model.depth=3"),
    "vgg8b": ("model.width=0.0625", "model.fc_width=64"),
}


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,vgg8b", help=f"of {', '.join(PRESETS)}")
    p.add_argument("--stages", type=int, default=2, help="S (default 2)")
    p.add_argument("--threads-per-stage", type=int, default=0,
                   help="torch threads in every process of every peer (default cores // S)")
    p.add_argument("--rules", default="pred,predsim", help="local rules for (b) and (c)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR), help="mnist-10k folder")
    p.add_argument("--scale-max", type=int, default=16, help="scaling model for S = 1..this")
    p.add_argument("--quick", action="store_true", help="tiny models and runs (a smoke test)")
    p.add_argument("--note", default="", help="free text stored in the JSON (machine state)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--micro-batches", default="", metavar="M,M,...",
                   help="measure pipelocal at these pipeline.micro_batches beside 1F1B at its "
                        "best (instead of the headline peers), e.g. 1,2,4,8")
    p.add_argument("--name", default=None,
                   help="file stem of the outputs (default bench; bench_micro with "
                        "--micro-batches)")
    p.add_argument("--runs-dir", default=None, help="keep pipelocal run dirs here")
    p.add_argument("--reanalyse", default=None, metavar="RESULT.json",
                   help="measure nothing: recompute a result's figures, tables and plot from "
                        "its raw measurements with this checkout's analysis, in place")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra config override (repeatable)")
    return p.parse_args(argv)


def preset_for(name: str, quick: bool) -> Preset:
    if name not in PRESETS:
        sys.exit(f"bench: model {name!r} has no preset; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if not quick:
        return p
    return Preset(label=p.label + " (quick)", overrides=p.overrides + QUICK[name], warmup=1,
                  steps=2, pipe_batches=4, pipe_epochs=3, concurrent_s=1.0, ideal_steps=3)


# --------------------------------------------------------------------------- running peers


class Runner:
    """Runs every peer of one model in fresh processes; knows the shared settings."""

    def __init__(self, args: argparse.Namespace, preset: Preset, root: Path) -> None:
        self.args, self.preset, self.root = args, preset, root
        self.threads = args.threads_per_stage or max(1, (os.cpu_count() or 1) // args.stages)
        self.base = [
            "data.name=mnist-10k",
            f"data.data_dir={args.data_dir!r}",
            f"data.batch_size={args.batch_size}",
            "run.device=cpu",
            *preset.overrides,
            *args.overrides,
        ]
        # Every peer's process keeps its freed host memory, as pipelocal's do (set at start-up;
        # torch pipelining's processes start from this one's environment).
        keep_host_memory()
        # the checkout's pipelocal and benchmarks package in every child (cwd is REPO_ROOT)
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                                   os.environ.get("PYTHONPATH", "")])}

    def config(self, rule: str, extra: list[str] | None = None) -> Config:
        return load_config(None, [*self.base, f"rule.name={rule!r}", *(extra or [])])

    def peer(self, task: str, rule: str, **spec: Any) -> dict[str, Any]:
        """(a), (b) or the profile, in a fresh process (its own peak RSS)."""
        with tempfile.TemporaryDirectory() as tmp:
            spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_path.write_text(json.dumps({
                "task": task, "threads": self.threads, "warmup": self.preset.warmup,
                "steps": self.preset.steps, "overrides": [*self.base, f"rule.name={rule!r}"],
                **spec,
            }))
            self._run([sys.executable, "-m", "benchmarks.headline.peers", str(spec_path),
                       str(out)])
            return json.loads(out.read_text())

    def concurrent(self, rule: str, partition: list[int]) -> list[dict[str, Any]]:
        """The concurrent ideal of (c): one process per stage, all started at once, each
        timing its stage's blocks on prepared inputs (peers.py ``concurrent``)."""
        with tempfile.TemporaryDirectory() as tmp:
            procs, outs = [], []
            for k in range(len(partition)):
                spec_path, out = Path(tmp) / f"spec{k}.json", Path(tmp) / f"out{k}.json"
                spec_path.write_text(json.dumps({
                    "task": "concurrent", "threads": self.threads, "warmup": self.preset.warmup,
                    "steps": self.preset.steps, "partition": partition, "stage": k,
                    "barrier": str(Path(tmp) / "barrier"),
                    "duration_s": self.preset.concurrent_s,
                    "overrides": [*self.base, f"rule.name={rule!r}"],
                }))
                with (Path(tmp) / f"err{k}.txt").open("w") as err:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.headline.peers", str(spec_path),
                         str(out)], env=self.env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                        stderr=err))
                outs.append(out)
            try:
                codes = [p.wait(timeout=1800) for p in procs]
            finally:
                for p in procs:
                    p.kill()
            if any(codes):
                errors = [(Path(tmp) / f"err{k}.txt").read_text()[-2000:]
                          for k, c in enumerate(codes) if c]
                raise RuntimeError("bench: the concurrent ideal failed:\n" + "\n".join(errors))
            return [json.loads(out.read_text()) for out in outs]

    def pipelocal(self, rule: str, name: str, epochs: int, batches: int,
                  partition: list[int], extra: tuple[str, ...] = (),
                  replicas: int = 1) -> dict[str, Any]:
        """(c) through the CLI (``extra``: more overrides; ``replicas``: data-parallel copies
        of the pipeline); returns the run's records and resolved config."""
        sets = [
            *self.base,
            f"rule.name={rule!r}",
            f"run.epochs={epochs}",
            f"run.checkpoint_every={epochs}",
            "run.progress=false",
            f"run.out_dir={str(self.root)!r}",
            f"run.name={name!r}",
            f"pipeline.threads_per_stage={self.threads}",
            f"pipeline.partition={partition}",
            f"data.train_limit={batches * self.args.batch_size}",  # 0 = all
            *extra,
        ]
        cmd = [sys.executable, "-m", "pipelocal", "train", "--stages", str(len(partition)),
               "--replicas", str(replicas)]
        for s in sets:
            cmd += ["--set", s]
        self._run(cmd)
        run_dir = self.root / name
        return {"records": read_metrics(run_dir), "config": read_run_config(run_dir),
                "command": cmd}

    def single_cli(self, rule: str, name: str, epochs: int, batches: int,
                   extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """Glob (or any rule) on one device through the CLI, for time to accuracy (``extra``:
        more overrides)."""
        sets = [*self.base, f"rule.name={rule!r}", f"run.epochs={epochs}",
                f"data.train_limit={batches * self.args.batch_size}",
                f"run.checkpoint_every={epochs}", "run.progress=false",
                f"run.out_dir={str(self.root)!r}", f"run.name={name!r}",
                f"run.threads={self.threads}", *extra]
        cmd = [sys.executable, "-m", "pipelocal", "train", "--stages", "1"]
        for s in sets:
            cmd += ["--set", s]
        self._run(cmd)
        return {"records": read_metrics(self.root / name), "command": cmd}

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"bench: {' '.join(cmd[:4])} ... failed with status "
                               f"{proc.returncode}:\n{proc.stderr[-3000:]}")


_GPU_MEMORY_KEYS = ("max_allocated(MiB)", "max_reserved(MiB)", "nvml_process(MiB)")


def ideal_steps(records: list[dict[str, Any]], stages: int) -> list[float] | None:
    """Each stage's ``ideal_step(s)`` averaged over ``records`` (None if one lacks it)."""
    keys = [f"stage{k}/ideal_step(s)" for k in range(stages)]
    if not records or any(key not in r for r in records for key in keys):
        return None
    return [sum(r[key] for r in records) / len(records) for key in keys]


def pipelocal_stats(run: dict[str, Any], stages: int) -> dict[str, Any]:
    """The measured epochs of a pipelocal run (every epoch after the first, a warm-up): the
    figures of the epoch of median throughput, and each measured epoch's throughput and
    concurrent ideal in the stages (``epochs``)."""
    records = run["records"]
    first = 1 if len(records) > 1 else 0
    epochs = [{"throughput(samples/s)": records[i]["throughput(samples/s)"],
               # The concurrent ideal in the stage processes just before (after the epoch
               # before) and just after the epoch, averaged; None without pipeline.ideal_steps.
               "ideal_step(s)": ideal_steps(records[max(i - 1, 0):i + 1], stages),
               "record": records[i]} for i in range(first, len(records))]
    median = sorted(epochs, key=lambda e: e["throughput(samples/s)"])[len(epochs) // 2]
    rec = median["record"]
    return {
        "throughput(samples/s)": rec["throughput(samples/s)"],
        "time/epoch(s)": rec["time/epoch(s)"],
        "samples": rec["stage0/samples"],
        "busy_fraction": [rec[f"stage{k}/busy(s)"] / rec[f"stage{k}/wall(s)"]
                          for k in range(stages)],
        "busy(s)": [rec[f"stage{k}/busy(s)"] for k in range(stages)],
        "recv_wait(s)": [rec[f"stage{k}/recv_wait(s)"] for k in range(stages)],
        "send_wait(s)": [rec[f"stage{k}/send_wait(s)"] for k in range(stages)],
        # Keys as the runtime writes them (pipelocal.meters.memory_stats): CPU peak RSS, or on
        # GPU the allocator's and NVML's figures.
        "peak_rss(MiB)": [rec.get(f"stage{k}/peak_rss(MiB)") for k in range(stages)],
        "gpu_memory(MiB)": [{key: rec[f"stage{k}/{key}"] for key in _GPU_MEMORY_KEYS
                             if f"stage{k}/{key}" in rec} for k in range(stages)],
        "ideal_step(s)": median["ideal_step(s)"],
        "record": rec,
        "epochs": epochs,
        "command": run["command"],
    }


# --------------------------------------------------------------------------- one model


def _num_blocks(cfg: Config) -> int:
    from pipelocal.data import load_dataset
    from pipelocal.models import build_model

    ds = load_dataset(cfg.data)
    return len(build_model(cfg.model, ds.in_shape, ds.num_classes))


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


_FACTORS = [2, 4, 8]
"""(d)'s micro-batch counts swept in the first repeat: these multiples of S."""


def _split(run: Runner, name: str, rules: list[str], glob: bool) -> tuple[dict[str, Any],
                                                                         list[int]]:
    """The profile of every block alone and the split balanced on the last rule's times."""
    n = _num_blocks(run.config("glob"))
    _log(f"{name}: profiling each of the {n} blocks alone ({run.threads} thread(s))")
    plan = run.peer("profile", rules[-1], rules=rules, partition=[1] * n, glob=glob,
                    glob_rows=micro_rows(run.args) if glob else [])
    return plan, split_of(plan, rules[-1], run.args.stages)


def micro_rows(args: argparse.Namespace) -> list[int]:
    """The rows of (d)'s micro-batches in its sweep: batch / (f x S) for f in _FACTORS."""
    return sorted({args.batch_size // m for _, m in _sweep(args, ("1f1b",))})


def split_of(plan: dict[str, Any], rule: str, stages: int) -> list[int]:
    """The split balanced on one rule's per-block times in ``plan`` (``glob``: the blocks'
    shares of a backprop step)."""
    from pipelocal.pipeline.partition import balanced_partition

    times = ([b["glob_s"] for b in plan["glob_blocks"]] if rule == "glob" else
             [b["local_s"] for b in plan["rules"][rule]["blocks"]])
    return balanced_partition(times, stages)


def _sweep(args: argparse.Namespace, schedules: tuple[str, ...]) -> list[tuple[str, int]]:
    s = args.stages
    return [(sched, f * s) for sched in schedules for f in _FACTORS
            if args.batch_size % (f * s) == 0]


def _best_settings(first: list[dict[str, Any]], schedules: tuple[str, ...]
                   ) -> list[tuple[str, int]]:
    """Each schedule's fastest micro-batch count in the first repeat's sweep."""
    return [(sched, max((x for x in first[0]["settings"] if x["schedule"] == sched),
                        key=lambda x: x["throughput(samples/s)"])["microbatches"])
            for sched in schedules]


def measure_model(args: argparse.Namespace, name: str, root: Path) -> dict[str, Any]:
    """Every peer of one model, ``--repeats`` times interleaved, and the time-to-accuracy runs."""
    from benchmarks.headline.torchpipe import run_torchpipe

    preset = preset_for(name, args.quick)
    run = Runner(args, preset, root)
    rules, s = args.rules.split(","), args.stages
    factors = _FACTORS
    cfg = run.config("glob")
    # Each peer's split balanced on its own per-block times: (c) per rule, (d) on backprop's.
    plan, _ = _split(run, name, rules, glob=True)
    splits = {rule: split_of(plan, rule, s) for rule in rules}
    glob_split = split_of(plan, "glob", s)
    sweep = _sweep(args, ("gpipe", "1f1b"))
    reps: list[dict[str, Any]] = []
    for i in range(args.repeats):
        rep: dict[str, Any] = {}
        _log(f"{name} repeat {i + 1}/{args.repeats}: (a) glob, (b) {rules} on one device")
        rep["a"] = run.peer("single", "glob")
        rep["b"] = {rule: run.peer("single", rule) for rule in rules}
        _log(f"{name} repeat {i + 1}: (c) pipelocal S={s} splits {splits}, each between two "
             "runs of its concurrent ideal")
        rep["c"], rep["concurrent"] = {}, {}
        for rule in rules:
            before = run.concurrent(rule, splits[rule])
            rep["c"][rule] = pipelocal_stats(run.pipelocal(
                rule, f"{name}-{rule}-r{i}", preset.pipe_epochs, preset.pipe_batches, splits[rule],
                (f"pipeline.ideal_steps={preset.ideal_steps}",)), s)
            rep["concurrent"][rule] = {"before": before,
                                       "after": run.concurrent(rule, splits[rule])}
        settings = sweep if i == 0 else _best_settings(reps[0]["d"], ("gpipe", "1f1b"))
        _log(f"{name} repeat {i + 1}: (d) torch.distributed.pipelining {settings} split "
             f"{glob_split}")
        rep["d"] = run_torchpipe(cfg, glob_split, settings, warmup=preset.warmup,
                                 steps=preset.steps, threads=run.threads,
                                 transport_rounds=20 if i == 0 else 0)
        _log(f"{name} repeat {i + 1}: each stage's blocks alone")
        rep["profile"] = {"rules": {rule: run.peer(
            "profile", rule, rules=[rule], partition=splits[rule], glob=False)["rules"][rule]
            for rule in rules}}
        reps.append(rep)
    raw = {
        "label": preset.label, "preset": preset.__dict__ | {"quick": args.quick},
        "overrides": run.base, "stages": s, "threads_per_process": run.threads,
        "rules": rules, "batch_size": args.batch_size, "partitions": splits,
        "partition_d": glob_split,
        "channel_depth": cfg.pipeline.channel_depth, "pipe_batches": preset.pipe_batches,
        "batches_per_epoch": -(-8000 // args.batch_size), "mb_factors": factors,
        "scale_max": args.scale_max, "plan_profile": plan, "repeats": reps,
        "pipelocal_command": reps[0]["c"][rules[-1]].get("command"),
    }
    return raw


def measure_micro(args: argparse.Namespace, name: str, root: Path) -> dict[str, Any]:
    """(c) at each ``--micro-batches`` count and (d) 1F1B at its best, ``--repeats`` times
    interleaved, for the rules whose loss is a mean over samples; memory at each count."""
    from benchmarks.headline.torchpipe import run_torchpipe
    from pipelocal.rules import RULES

    preset = preset_for(name, args.quick)
    run = Runner(args, preset, root)
    counts = [int(m) for m in args.micro_batches.split(",")]
    rules = [r for r in args.rules.split(",") if not RULES.get(r).couples_samples]
    skipped = sorted(set(args.rules.split(",")) - set(rules))
    if skipped:
        _log(f"skipping {skipped}: their loss couples a batch's samples (the similarity "
             "matrix), so micro-batches change what they compute")
    if not rules:
        sys.exit(f"bench: none of --rules {args.rules} takes micro-batches; use e.g. pred")
    _, partition = _split(run, name, rules, glob=False)
    memory = {rule: run.peer("micro_memory", rule, micro_batches=counts) for rule in rules}
    reps: list[dict[str, Any]] = []
    for i in range(args.repeats):
        _log(f"{name} repeat {i + 1}/{args.repeats}: (c) pipelocal S={args.stages} "
             f"partition {partition}, micro-batches {counts}")
        rep: dict[str, Any] = {"c": {rule: {str(m): pipelocal_stats(run.pipelocal(
            rule, f"{name}-{rule}-m{m}-r{i}", 2, preset.pipe_batches, partition,
            (f"pipeline.micro_batches={m}",)), args.stages) for m in counts} for rule in rules}}
        settings = _sweep(args, ("1f1b",)) if i == 0 else _best_settings(reps[0]["d"],
                                                                         ("1f1b",))
        _log(f"{name} repeat {i + 1}: (d) torch.distributed.pipelining {settings}")
        rep["d"] = run_torchpipe(run.config("glob"), partition, settings, warmup=preset.warmup,
                                 steps=preset.steps, threads=run.threads, transport_rounds=0)
        reps.append(rep)
    return {
        "label": preset.label, "preset": preset.__dict__ | {"quick": args.quick},
        "overrides": run.base, "stages": args.stages, "threads_per_process": run.threads,
        "rules": rules, "skipped_rules": skipped, "micro_batches": counts,
        "batch_size": args.batch_size, "partition": partition,
        "channel_depth": run.config(rules[0]).pipeline.channel_depth,
        "pipe_batches": preset.pipe_batches, "memory": memory, "repeats": reps,
        "pipelocal_command": reps[0]["c"][rules[0]][str(counts[-1])].get("command"),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from benchmarks.headline.analysis import analyse_micro, analyse_model

    args = parse_args(argv)
    if args.reanalyse:
        return reanalyse(Path(args.reanalyse))
    args.name = args.name or ("bench_micro" if args.micro_batches else "bench")
    require_mnist_10k(args.data_dir, "bench")
    prov = Provenance(args.name)
    names = args.models.split(",")
    models: dict[str, Any] = {}
    measure, analyse = ((measure_micro, analyse_micro) if args.micro_batches
                        else (measure_model, analyse_model))
    with tempfile.TemporaryDirectory(prefix="pipelocal-bench-") as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        for name in names:
            raw = measure(args, name, root)
            models[name] = {"raw": raw, **analyse(raw)}
            # Written after every model, so that a stopped run keeps what it measured.
            path = write_outputs(args, prov, models, complete=len(models) == len(names))
    plotted = "" if args.micro_batches else f" and {plot_path(Path(args.out_dir), args.name)}"
    _log(f"wrote {path}, the .md beside it{plotted}")
    return 0


def plot_path(out_dir: Path, name: str) -> Path:
    """The plot of a result: docs/img/ for the committed results (the docs show it), beside
    the JSON for any other --out-dir."""
    if out_dir.resolve() == RESULTS_DIR.resolve():
        DOCS_IMG_DIR.mkdir(parents=True, exist_ok=True)
        return DOCS_IMG_DIR / f"{name}.png"
    return out_dir / f"{name}.png"


def reanalyse(path: Path) -> int:
    """Recompute the figures of the result at ``path`` from its raw measurements (the model
    or the report changed, the measurements did not); the measurement's provenance stays and
    ``reanalysed`` records this command and the checkout's revision. Rewrites the JSON, the
    .md beside it and the plot."""
    import shlex
    import time

    from benchmarks.common import git_revision
    from benchmarks.headline.analysis import DEFINITIONS, analyse_micro, analyse_model

    result = json.loads(path.read_text())
    micro = bool(result["settings"].get("micro_batches"))
    analyse = analyse_micro if micro else analyse_model
    result["models"] = {name: {"raw": m["raw"], **analyse(m["raw"])}
                        for name, m in result["models"].items()}
    result["definitions"] = DEFINITIONS
    result["reanalysed"] = {"command": shlex.join(sys.orig_argv), "git": git_revision(),
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(result, indent=2) + "\n")
    _render(result, path.parent, path.stem, micro)
    _log(f"re-analysed {path}, the .md beside it"
         + ("" if micro else f" and {plot_path(path.parent, path.stem)}"))
    return 0


def _render(result: dict[str, Any], out_dir: Path, name: str, micro: bool) -> str:
    from benchmarks.headline.report import markdown, micro_markdown, plot

    text = micro_markdown(result) if micro else markdown(result)
    (out_dir / f"{name}.md").write_text(text)
    if not micro:
        plot(result, plot_path(out_dir, name))
    return text


def write_outputs(args: argparse.Namespace, prov: Provenance, models: dict[str, Any], *,
                  complete: bool) -> Path:
    from benchmarks.headline.analysis import DEFINITIONS

    # 1-minute load average before the run and now; above ~0.5 other work shared the cores.
    loads = [prov.load_before[0] if prov.load_before else 0.0, os.getloadavg()[0]]
    note = args.note or (f"machine shared with other jobs (1-minute load average {loads[0]:.1f} "
                         f"before the run, {loads[1]:.1f} at the end)" if max(loads) > 0.5
                         else "machine quiet (1-minute load average <= 0.5 before and after)")
    out_dir = Path(args.out_dir)
    payload = {
        "complete": complete,
        "machine_note": note,
        "settings": dict(vars(args)),
        "definitions": DEFINITIONS,
        "gpu_path": "not measured: the benchmark runs every peer on the CPU and this machine "
        "has no GPU; GPU figures would come from the scaling model fed with per-block costs "
        "measured on that GPU",
        "models": models,
    }
    path = write_result(prov, payload, out_dir / f"{args.name}.json")
    text = _render(json.loads(path.read_text()), out_dir, args.name, bool(args.micro_batches))
    print(text, flush=True)
    return path

if __name__ == "__main__":
    sys.exit(main())
