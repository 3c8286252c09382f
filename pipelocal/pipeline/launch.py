"""Starting a pipeline: spawned workers (``pipelocal train --stages S``) or torchrun ranks.

Both paths run :func:`_worker` in every process, one rank per stage: rank 0 is stage 0 and
also the coordinator (data, epochs, evaluation, metrics, checkpoints). Under ``--stages S``
this process validates the run, spawns the S workers and supervises them: the first failure
stops every worker within seconds and comes back as one :class:`PipelineError` naming the stage,
the batch and the original traceback. Under torchrun, torchrun supervises.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.config import Config, ConfigError
from pipelocal.data import load_dataset, make_loaders
from pipelocal.engine import Engine, build_blocks
from pipelocal.metrics import Metrics
from pipelocal.pipeline.channel import P2PChannel, PeerError
from pipelocal.pipeline.coordinator import DistPipe
from pipelocal.pipeline.partition import stage_ranges
from pipelocal.pipeline.plan import make_plan
from pipelocal.pipeline.stage import Stage
from pipelocal.rules import RULES
from pipelocal.run import (
    Setup,
    dry_run,
    open_run_dir,
    prepare,
    resolve_device,
    validate,
)
from pipelocal.trainer import Trainer, install_sigint_handler, request_stop

__all__ = ["PipelineError", "spawn", "torchrun_worker", "under_torchrun"]

_GRACE_S = 2.0
"""After the first failure: how long the other workers get to report before they are killed."""
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class PipelineError(RuntimeError):
    """A pipeline worker failed; the message names the stage, the batch and the traceback."""


def under_torchrun() -> bool:
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE",
                                                                   "MASTER_ADDR"))


def stage_threads(cfg: Config) -> int:
    """torch threads per stage process: the configured count, else cores // stages (>= 1)."""
    cores = os.cpu_count() or 1
    return cfg.pipeline.threads_per_stage or max(1, cores // max(cfg.pipeline.stages, 1))


def resolve_partition(setup: Setup, partition: list[int]) -> list[int]:
    """The explicit partition, or the balanced one from profiling every block here."""
    if partition:
        return partition
    threads = torch.get_num_threads()
    torch.set_num_threads(stage_threads(setup.cfg))  # profile as the stages will run
    try:
        plan = make_plan(setup.cfg, setup.specs, setup.num_classes, resolve_device(setup.cfg))
    finally:
        torch.set_num_threads(threads)
    return plan.partition


def _finalise(setup: Setup, partition: list[int]) -> None:
    partition = resolve_partition(setup, partition)
    dry_run(setup, partition)
    stages, gpus = len(partition), torch.cuda.device_count()
    if resolve_device(setup.cfg).type == "cuda" and stages > gpus:
        warnings.warn(f"{stages} stages share {gpus} GPU(s) round-robin (stage k on GPU k % "
                      f"{gpus}); expect less than a {stages}x speed-up", stacklevel=2)
    setup.cfg = setup.cfg.replace(pipeline={"partition": partition})
    open_run_dir(setup)


# --------------------------------------------------------------------------- the worker


def _worker(
    setup: Setup | None,
    *,
    rank: int,
    world: int,
    local_rank: int,
    store: dist.Store | None,
    cfg: Config,
    stage_box: list[Stage],
) -> dict[str, Any] | None:
    """One rank of the pipeline; returns the training summary on rank 0."""
    torch.set_num_threads(stage_threads(cfg))
    device = resolve_device(cfg, local_rank)
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    # Statistics, set-up and checkpoints go over a separate gloo group, never over the data path.
    control = dist.new_group(backend="gloo", timeout=timeout)
    box = [setup]
    dist.broadcast_object_list(box, src=0, group=control)  # torchrun: rank 0 built it
    setup = box[0]
    assert setup is not None
    cfg = setup.cfg
    specs = setup.specs
    r = stage_ranges(cfg.pipeline.partition)[rank]
    engine = Engine(build_blocks(cfg, specs, setup.num_classes, r, device))
    if setup.resume is not None:
        engine.load(setup.resume)
    wire = dict(
        stage=rank, batch_size=cfg.data.batch_size, depth=cfg.pipeline.channel_depth,
        wire_dtype=getattr(torch, cfg.pipeline.wire_dtype), timeout_s=cfg.pipeline.timeout_s,
        device=device,
        image_shape=specs[0].in_shape if getattr(RULES.get(cfg.rule.name), "needs_image", False)
        else None,  # InfoPro: the input image travels with the activation
    )
    inbox = (P2PChannel(wire_shape_in=specs[r.start - 1].wire_shape, wire_shape_out=None, **wire)
             if rank > 0 else None)
    outbox = (P2PChannel(wire_shape_in=None, wire_shape_out=specs[r.stop - 1].wire_shape, **wire)
              if rank < world - 1 else None)
    stage = Stage(rank, engine, inbox=inbox, outbox=outbox, control=control,
                  run_dir=setup.run_dir)
    stage_box.append(stage)
    if rank > 0:
        stage.serve()
        return None
    dataset = load_dataset(cfg.data)
    train_loader, test_loader = make_loaders(dataset, cfg.data, cfg.run.seed)
    metrics = Metrics(setup.run_dir, progress=cfg.run.progress)
    metrics.echo(
        f"pipelocal: {cfg.model.name} ({len(specs)} blocks) with rule {cfg.rule.name} on "
        f"{dataset.name}, pipelined over {world} stages {list(cfg.pipeline.partition)} "
        f"({backend}, {device.type}); run directory {setup.run_dir}"
    )
    pipe = DistPipe(stage, num_stages=world, wire_batch=cfg.data.batch_size)
    trainer = Trainer(cfg, pipe, specs, train_loader, test_loader, setup.run_dir,
                      metrics=metrics, start=setup.start)
    result = trainer.fit()
    pipe.close()
    return result


def _report(rank: int, stage_box: list[Stage], exc: BaseException) -> dict[str, Any]:
    epoch, step = stage_box[0].current if stage_box else (-1, -1)
    text = f"{type(exc).__name__}: {exc}"
    return {
        "rank": rank,
        "pid": os.getpid(),
        "epoch": epoch,
        "step": step,
        "error": text,
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": isinstance(exc, PeerError) or any(s in text for s in _SECONDARY),
    }


def _spawned_main(
    setup: Setup, rank: int, world: int, port: int, errors: Any, results: Any, stop: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
    stage_box: list[Stage] = []
    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=timedelta(seconds=setup.cfg.pipeline.timeout_s))
        if rank == 0:
            threading.Thread(target=lambda: stop.wait() and request_stop(), daemon=True).start()
        result = _worker(setup, rank=rank, world=world, local_rank=rank, store=store,
                         cfg=setup.cfg, stage_box=stage_box)
        if rank == 0:
            results.put(result)
    except BaseException as exc:  # reported to the supervisor, which raises it
        errors.put(_report(rank, stage_box, exc))
        code = 1
    for q in (errors, results):
        q.close()
        q.join_thread()
    # Receives posted ahead for messages that never come would block a clean teardown of the
    # process group; every result and error has been delivered, so leave at once.
    os._exit(code)


# --------------------------------------------------------------------------- spawn + supervise


def spawn(setup: Setup, partition: list[int]) -> dict[str, Any]:
    """Run the pipeline in ``pipeline.stages`` spawned worker processes and supervise them."""
    _finalise(setup, partition)
    cfg, world = setup.cfg, setup.cfg.pipeline.stages
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=cfg.pipeline.timeout_s))
    ctx = mp.get_context("spawn")
    errors, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_spawned_main, name=f"pipelocal-stage{rank}",
                    args=(setup, rank, world, store.port, errors, results, stop))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    previous = signal.getsignal(signal.SIGINT)
    interrupted = [0]

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted[0] += 1
        if interrupted[0] == 1:
            print("\ninterrupted: writing a checkpoint, then stopping (Ctrl-C again to abort)",
                  flush=True)
            stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    try:
        reports, result, first_dead = _supervise(procs, errors, results, interrupted)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
        _kill_all(procs)
    failed = [p for p in procs if p.exitcode != 0]
    if reports or failed or result is None:
        raise PipelineError(_describe_failure(procs, reports, first_dead))
    return result


def _supervise(
    procs: list[Any], errors: Any, results: Any, interrupted: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, int | None]:
    """Wait for the workers; after the first failure give the others _GRACE_S to report."""
    reports: list[dict[str, Any]] = []
    result: dict[str, Any] | None = None
    deadline: float | None = None
    first_dead: int | None = None  # rank of the first worker seen dead by a signal
    while any(p.is_alive() for p in procs):
        mp_wait([p.sentinel for p in procs] + [errors._reader, results._reader], timeout=0.5)
        while not errors.empty():
            reports.append(errors.get())
        while not results.empty():
            result = results.get()
        for rank, p in enumerate(procs):
            if first_dead is None and p.exitcode is not None and p.exitcode < 0:
                first_dead = rank
        failing = reports or any(p.exitcode not in (None, 0) for p in procs)
        if (failing or interrupted[0] > 1) and deadline is None:
            deadline = time.monotonic() + (_GRACE_S if failing else 0.0)
        if deadline is not None and time.monotonic() >= deadline:
            break
    for q, sink in ((errors, reports), (results, None)):
        while True:
            try:
                item = q.get(timeout=0.2) if not q.empty() else None
            except Exception:
                item = None
            if item is None:
                break
            if sink is None:
                result = item
            else:
                sink.append(item)
    return reports, result, first_dead


def _kill_all(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def _describe_failure(
    procs: list[Any], reports: list[dict[str, Any]], first_dead: int | None
) -> str:
    primary = [r for r in reports if not r["secondary"]]
    if primary:
        r = primary[0]
        where = f"epoch {r['epoch']}, batch {r['step']}" if r["step"] >= 0 else "start-up"
        return (
            f"stage {r['rank']} (rank {r['rank']}, pid {r['pid']}) failed at {where}: "
            f"{r['error']}\n--- original traceback of stage {r['rank']} ---\n{r['traceback']}"
        )
    if first_dead is not None:
        rank, p = first_dead, procs[first_dead]
        # Downstream stages had finished batches before the lost one, upstream ones had sent it.
        down = [r["step"] + 1 for r in reports if r["rank"] > rank and r["step"] >= 0]
        up = [r["step"] for r in reports if r["rank"] < rank and r["step"] >= 0]
        near = ""
        if down or up:
            lo, hi = (max(down) if down else 0), (max(up) if up else max(down))
            near = f" at batch {lo}" if lo >= hi else f" between batches {lo} and {hi}"
        name = signal.Signals(-p.exitcode).name
        return (
            f"stage {rank} (rank {rank}, pid {p.pid}) died, killed by signal {name}{near}; "
            "the other stages were stopped. The last complete checkpoint is still usable."
        )
    if reports:
        r = reports[0]
        return (f"stage {r['rank']} (rank {r['rank']}) failed at batch {r['step']}: "
                f"{r['error']}\n{r['traceback']}")
    codes = {rank: p.exitcode for rank, p in enumerate(procs)}
    return f"pipeline workers ended without a result (exit codes by stage: {codes})"


# --------------------------------------------------------------------------- torchrun


def torchrun_worker(cfg: Config, resume: str | Path | None) -> dict[str, Any] | None:
    """This process is one rank of ``torchrun --nproc-per-node S -m pipelocal train ...``."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cfg.pipeline.stages not in (0, 1, world):
        raise ConfigError(
            f"pipeline.stages = {cfg.pipeline.stages} but torchrun started {world} processes; "
            f"one process runs one stage: set pipeline.stages = {world} or start "
            f"{cfg.pipeline.stages} processes"
        )
    cfg = cfg.replace(pipeline={"stages": world})
    setup: Setup | None = None
    if rank == 0:
        install_sigint_handler()
        setup, _ = prepare(cfg, resume)
        partition = validate(setup)
        _finalise(setup, partition)
    result = _worker(setup, rank=rank, world=world, local_rank=local_rank, store=None, cfg=cfg,
                     stage_box=[])
    dist.destroy_process_group()
    return result
