"""``pipelocal train --stages S``: S worker processes spawned here, and their supervisor.

The processes are started and reaped by ``torch.multiprocessing`` (its process context kills
the others after the first failure, with a grace period for them to report). Each worker runs
:func:`~pipelocal.pipeline.worker.run_rank`, writes its result or its failure report (stage,
pid, phase, batch, traceback) to a file, and dies with its parent (``PR_SET_PDEATHSIG``), so a
killed launcher leaves no orphan. Ctrl-C and SIGTERM here are forwarded to the coordinator as a
stop file: checkpoint at the current step, stop every worker, report "interrupted".
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.multiprocessing.spawn import (
    ProcessException,
    ProcessExitedException,
    ProcessRaisedException,
)

from pipelocal.checkpoint import last_complete_note
from pipelocal.launch.report import (
    Death,
    describe_failure,
    failure_report,
    forward_stop_signals,
    raise_outcome,
    rank_name,
    replica_stages,
)
from pipelocal.pipeline.worker import run_rank
from pipelocal.runspec import Position, RunSpec
from pipelocal.stop import Interrupted, die_with_parent, stop_requested, watch_stop_file

__all__ = ["PipelineError", "spawn"]

START_METHOD = "forkserver"
"""How workers start: forked from a server process that imported torch and pipelocal once (the
first run of this launcher starts it), so a worker starts in milliseconds instead of importing
torch again (seconds). The server never touches CUDA, so its children may (CUDA cannot be used
in a child forked from a process that initialised it); each worker takes the run's
environment, and dies with the launcher, as a spawned one would."""
_GRACE_S = 2.0
"""After the first failure: how long the other workers get to report before they are killed."""
_PHASES = ("start-up", "training", "evaluation", "end-of-epoch gather", "evaluation gather",
           "checkpoint", "shutdown")
"""Phases a worker reports through shared memory (by index), as :class:`Stage` names them."""
_SLOTS = 4
"""Shared-memory integers per worker: phase index, epoch, batch, step (-1 = none yet)."""


class PipelineError(RuntimeError):
    """A pipeline worker failed; the message names the stage, the batch and the traceback."""


def _write(path: Path, obj: Any) -> None:
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_bytes(pickle.dumps(obj))
    os.replace(tmp_path, path)


def _worker_main(rank: int, spec: RunSpec, port: int, parent: int, talk: str,
                 progress: Any, env: dict[str, str]) -> None:
    die_with_parent(parent)
    # The forkserver's environment is the launcher's when the server started; the run's is now.
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the supervisor's
    talk_dir, world, stage_box = Path(talk), spec.world, []
    try:
        if rank == 0:
            watch_stop_file(talk_dir / "stop")
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=timedelta(seconds=spec.cfg.pipeline.timeout_s))

        def on_phase(phase: str, pos: Position | None) -> None:
            # Every message: four integers into shared memory, no file, no lock.
            at = rank * _SLOTS
            progress[at + 1:at + _SLOTS] = [pos.epoch, pos.batch, pos.step] if pos else [-1] * 3
            progress[at] = _PHASES.index(phase) if phase in _PHASES else 0

        result = run_rank(spec.cfg, spec, rank=rank, world=world, local_rank=rank,
                          local_world=world, store=store, stage_box=stage_box,
                          on_phase=on_phase)
        if rank == 0:
            _write(talk_dir / "result.pkl", result)
    except BaseException as exc:  # reported to the supervisor, which raises it
        _write(talk_dir / f"error{rank}.pkl", failure_report(rank, stage_box, exc))
        os._exit(1)  # the process group may hold transfers that can never complete


def preload_modules() -> list[str]:
    """What the forkserver imports before it forks any worker: this module, and with it torch
    and the worker body, and ``torch._dynamo``, which torch's optimisers import on their first
    call (seconds). None of them may make a CUDA call at import."""
    return [__name__, "torch._dynamo"]


def worker_context() -> Any:
    """The multiprocessing context workers start from: the forkserver, with its preload set
    (read when the server starts, once per launcher)."""
    ctx = tmp.get_context(START_METHOD)
    ctx.set_forkserver_preload(preload_modules())
    return ctx


def spawn(spec: RunSpec) -> dict[str, Any]:
    """Run the pipeline in ``pipeline.replicas x pipeline.stages`` spawned worker processes and
    supervise them."""
    cfg, world = spec.cfg, spec.world
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=cfg.pipeline.timeout_s))
    progress = worker_context().RawArray("q", [0, -1, -1, -1] * world)
    with tempfile.TemporaryDirectory(prefix="pipelocal-") as talk:
        ctx = tmp.start_processes(
            _worker_main, args=(spec, store.port, os.getpid(), talk, progress, dict(os.environ)),
            nprocs=world, join=False, start_method=START_METHOD)
        failure = _supervise(ctx, Path(talk), spec)
        return _outcome(ctx, Path(talk), failure, spec, _positions(progress, world, spec))


def _positions(progress: Any, world: int, spec: RunSpec) -> dict[int, tuple[str, str | None]]:
    """{rank: (phase, position)} as each worker last put them in shared memory."""
    out = {}
    for rank in range(world):
        phase, epoch, batch, step = progress[rank * _SLOTS:(rank + 1) * _SLOTS]
        where = (Position(epoch, batch, step).where(spec.cfg.run.epochs) if step >= 0
                 else None)
        out[rank] = (_PHASES[phase], where)
    return out


def _supervise(ctx: Any, talk: Path, spec: RunSpec) -> BaseException | None:
    """Wait for the workers; forward one stop request; a second one kills them."""
    with forward_stop_signals() as hits:
        try:
            while True:
                if stop_requested() and not (talk / "stop").exists():
                    (talk / "stop").touch()  # rank 0 checks it before every batch
                if hits[0] > 1:
                    _kill(ctx)
                    return Interrupted("aborted by a second interrupt before the checkpoint; "
                                       f"{last_complete_note(spec.run_dir)}")
                try:
                    if ctx.join(timeout=0.5, grace_period=_GRACE_S):
                        return None
                except ProcessException as exc:  # exited, or raised before it could report
                    return exc
        finally:
            _kill(ctx)


def _kill(ctx: Any) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(timeout=10)


def _outcome(ctx: Any, talk: Path, failure: BaseException | None, spec: RunSpec,
             progress: dict[int, tuple[str, str | None]]) -> dict[str, Any]:
    if isinstance(failure, Interrupted):
        raise failure
    reports = [pickle.loads(p.read_bytes()) for p in sorted(talk.glob("error*.pkl"))]
    result_file = talk / "result.pkl"
    if failure is None and not reports and result_file.exists():
        return pickle.loads(result_file.read_bytes())
    raise_outcome(reports, spec.run_dir)  # a non-finite loss, a full disk: not a crash
    dead = None
    if isinstance(failure, ProcessExitedException) and failure.exit_code < 0:
        rank = failure.error_index
        p = ctx.processes[rank]
        dead = Death(rank, p.pid, f"killed by signal {signal.Signals(-p.exitcode).name}")
    if isinstance(failure, ProcessRaisedException) and not reports:
        # Failed before run_rank could report (e.g. unpickling the set-up): torch's own report.
        who = rank_name(failure.error_index, replica_stages(spec))
        raise PipelineError(f"{who} failed at start-up: {failure}")
    reported = {r["rank"] for r in reports}
    silent = {rank: p.pid for rank, p in enumerate(ctx.processes)
              if (dead is None or rank != dead.rank) and p.exitcode is not None
              and p.exitcode < 0 and rank not in reported}
    codes = {rank: p.exitcode for rank, p in enumerate(ctx.processes)}
    raise PipelineError(describe_failure(
        reports, dead, f"pipeline workers ended without a result (exit codes by stage: {codes})",
        silent=silent, progress=progress, run_dir=spec.run_dir, stages=replica_stages(spec)))
