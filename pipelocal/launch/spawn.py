"""``pipelocal train --stages S``: S worker processes spawned here, and their supervisor.

The processes are started and reaped by ``torch.multiprocessing`` (its process context kills
the others after the first failure, with a grace period for them to report). Each worker runs
:func:`~pipelocal.pipeline.worker.run_rank`, writes its result or its failure report (stage,
pid, phase, batch, traceback) to a file, and dies with its parent (``PR_SET_PDEATHSIG``), so a
killed launcher leaves no orphan. Ctrl-C and SIGTERM here are forwarded to the coordinator as a
stop file: checkpoint at the current step, stop every worker, report "interrupted".
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import tempfile
import threading
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as tmp

from pipelocal.launch.preflight import finalise
from pipelocal.pipeline.channel import PeerError
from pipelocal.pipeline.stage import Stage
from pipelocal.pipeline.worker import run_rank
from pipelocal.setup import Setup
from pipelocal.trainer import NonFiniteLoss, request_stop, stop_requested, watch_stop_file

__all__ = ["Interrupted", "PipelineError", "check_not_stopped", "die_with_parent", "spawn"]

_GRACE_S = 2.0
"""After the first failure: how long the other workers get to report before they are killed."""
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "timed out", "timeout")
"""Errors that follow another stage's failure: a peer gone, or a wait on a peer that timed out."""
_PR_SET_PDEATHSIG = 1


class PipelineError(RuntimeError):
    """A pipeline worker failed; the message names the stage, the batch and the traceback."""


class Interrupted(RuntimeError):
    """The run was stopped by Ctrl-C / SIGTERM before it could checkpoint: during set-up, or
    aborted by a second one."""


def check_not_stopped() -> None:
    """Ctrl-C / SIGTERM during set-up: stop before any worker starts (nothing to checkpoint)."""
    if stop_requested():
        raise Interrupted("stopped during set-up, before training started; nothing was "
                          "trained, so no checkpoint was written")


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own clean-up still applies
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _report(rank: int, stage_box: list[Stage], exc: BaseException) -> dict[str, Any]:
    stage = stage_box[0] if stage_box else None
    epoch, step = stage.current if stage else (-1, -1)
    text = f"{type(exc).__name__}: {exc}"
    return {
        "rank": rank,
        "pid": os.getpid(),
        "epoch": epoch,
        "step": step,
        "phase": stage.phase if stage else "start-up",
        "error": text,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": isinstance(exc, PeerError)
        or any(s.lower() in text.lower() for s in _SECONDARY),
    }


def _write(path: Path, obj: Any) -> None:
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_bytes(pickle.dumps(obj))
    os.replace(tmp_path, path)


def _worker_main(rank: int, setup: Setup, port: int, parent: int, talk: str) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the supervisor's
    talk_dir, world, stage_box = Path(talk), setup.cfg.pipeline.stages, []
    try:
        if rank == 0:
            watch_stop_file(talk_dir / "stop")
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=timedelta(seconds=setup.cfg.pipeline.timeout_s))

        def on_phase(phase: str, epoch: int, step: int) -> None:
            _write(talk_dir / f"phase{rank}.pkl", (phase, epoch, step))

        result = run_rank(setup.cfg, setup, rank=rank, world=world, local_rank=rank,
                          local_world=world, store=store, stage_box=stage_box,
                          on_phase=on_phase)
        if rank == 0:
            _write(talk_dir / "result.pkl", result)
    except BaseException as exc:  # reported to the supervisor, which raises it
        _write(talk_dir / f"error{rank}.pkl", _report(rank, stage_box, exc))
        os._exit(1)  # the process group may hold transfers that can never complete


def spawn(setup: Setup, partition: list[int]) -> dict[str, Any]:
    """Run the pipeline in ``pipeline.stages`` spawned worker processes and supervise them."""
    finalise(setup, partition, in_subprocess=True)
    check_not_stopped()  # profiling can take a while: Ctrl-C during it stops here
    cfg, world = setup.cfg, setup.cfg.pipeline.stages
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=cfg.pipeline.timeout_s))
    with tempfile.TemporaryDirectory(prefix="pipelocal-") as talk:
        ctx = tmp.start_processes(_worker_main, args=(setup, store.port, os.getpid(), talk),
                                  nprocs=world, join=False, start_method="spawn")
        failure = _supervise(ctx, Path(talk))
        return _outcome(ctx, Path(talk), failure)


def _supervise(ctx: Any, talk: Path) -> BaseException | None:
    """Wait for the workers; forward one stop request; a second one kills them."""
    signals = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signals} if main else {}
    hits = [0]

    def on_signal(signum: int, frame: Any) -> None:
        hits[0] += 1
        if hits[0] == 1:
            name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
            print(f"\n{name}: writing a checkpoint, then stopping (Ctrl-C again to abort)",
                  flush=True)
            request_stop()

    for s in previous:
        signal.signal(s, on_signal)
    try:
        while True:
            if stop_requested() and not (talk / "stop").exists():
                (talk / "stop").touch()  # rank 0 checks it before every batch
            if hits[0] > 1:
                _kill(ctx)
                return Interrupted("aborted by a second interrupt before the checkpoint; the "
                                   "last complete checkpoint is still usable")
            try:
                if ctx.join(timeout=0.5, grace_period=_GRACE_S):
                    return None
            except tmp.ProcessExitedException as exc:
                return exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _kill(ctx)


def _kill(ctx: Any) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(timeout=10)


def _outcome(ctx: Any, talk: Path, failure: BaseException | None) -> dict[str, Any]:
    if isinstance(failure, Interrupted):
        raise failure
    reports = [pickle.loads(p.read_bytes()) for p in sorted(talk.glob("error*.pkl"))]
    result_file = talk / "result.pkl"
    if failure is None and not reports and result_file.exists():
        return pickle.loads(result_file.read_bytes())
    for r in reports:
        if r.get("type") == NonFiniteLoss.__name__:  # a training outcome, not a crash
            raise NonFiniteLoss(r["message"])
    first_dead = None
    if isinstance(failure, tmp.ProcessExitedException) and failure.exit_code < 0:
        first_dead = failure.error_index
    phases = {int(p.stem[5:]): pickle.loads(p.read_bytes()) for p in talk.glob("phase*.pkl")}
    raise PipelineError(_describe(ctx.processes, reports, first_dead, phases))


def _describe(procs: list[Any], reports: list[dict[str, Any]], first_dead: int | None,
              phases: dict[int, tuple[str, int, int]] | None = None) -> str:
    primary = [r for r in reports if not r["secondary"]]
    silent = [rank for rank, p in enumerate(procs)
              if rank != first_dead and p.exitcode is not None and p.exitcode < 0
              and not any(r["rank"] == rank for r in reports)]
    if primary:
        r = min(primary, key=lambda r: r["rank"])
        where = f"epoch {r['epoch']}, batch {r['step']}" if r["step"] >= 0 else r["phase"]
        return (
            f"stage {r['rank']} (rank {r['rank']}, pid {r['pid']}) failed at {where}: "
            f"{r['error']}\n--- original traceback of stage {r['rank']} ---\n{r['traceback']}"
        )
    if first_dead is not None:
        rank, p = first_dead, procs[first_dead]
        name = signal.Signals(-p.exitcode).name
        return (
            f"stage {rank} (rank {rank}, pid {p.pid}) died, killed by signal {name}"
            f"{_near(rank, reports)}; the other stages were stopped. The last complete "
            "checkpoint is still usable."
        )
    if silent and reports:  # alive but mute while the others timed out waiting: frozen
        rank, p = max(silent), procs[max(silent)]  # the others waited on the last mute one
        phase, epoch, step = (phases or {}).get(rank, ("start-up", -1, -1))
        since = f" (since epoch {epoch + 1}, batch {step})" if step >= 0 else ""
        waiting = "; ".join(f"stage {r['rank']} in {r['phase']}" for r in reports)
        return (
            f"stage {rank} (rank {rank}, pid {p.pid}) stopped answering during {phase}{since}"
            f"{_near(rank, reports)}: it was alive but silent when the other stages gave up "
            f"waiting for it ({waiting}; pipeline.timeout_s). It was killed with the others. "
            + ("A stage still starting up may only be slow (imports, a loaded machine): "
               "raise pipeline.timeout_s. " if phase == "start-up" else
               "A frozen stage is stopped (SIGSTOP, a debugger), deadlocked or stuck in a "
               "device call. ")
            + "The last complete checkpoint is still usable."
        )
    if reports:
        r = reports[0]
        return (f"stage {r['rank']} (rank {r['rank']}) failed during {r['phase']} at batch "
                f"{r['step']}: {r['error']}\n{r['traceback']}")
    codes = {rank: p.exitcode for rank, p in enumerate(procs)}
    return f"pipeline workers ended without a result (exit codes by stage: {codes})"


def _near(rank: int, reports: list[dict[str, Any]]) -> str:
    """Where stage ``rank`` was, from its neighbours: the stages after it had finished the
    batches before the lost one, the stages before it had sent it."""
    down = [r["step"] + 1 for r in reports if r["rank"] > rank and r["step"] >= 0]
    up = [r["step"] for r in reports if r["rank"] < rank and r["step"] >= 0]
    if not (down or up):
        return ""
    lo, hi = (max(down) if down else 0), (max(up) if up else max(down))
    return f" at batch {lo}" if lo >= hi else f" between batches {lo} and {hi}"
