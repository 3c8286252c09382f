"""What every supervising launcher (spawn, Ray) shares: a worker's failure report, the one error
message made from the reports of all workers, and forwarding Ctrl-C / SIGTERM as a stop request.

A worker catches its exception and sends :func:`failure_report` to its supervisor (a file under
spawn, the actor's return value under Ray). The supervisor collects the reports of every worker
for a short grace period, stops them all, and raises a PipelineError with
:func:`describe_failure`: the first worker that failed on its own (not because a peer vanished),
else the one that died, with the batch it died near.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelocal.checkpoint import DiskFull, last_complete_note, remove_incomplete
from pipelocal.pipeline.channel import PeerError
from pipelocal.pipeline.stage import Stage
from pipelocal.runspec import RunSpec
from pipelocal.stop import request_stop
from pipelocal.trainer import NonFiniteLoss

__all__ = ["Death", "describe_failure", "failure_report", "forward_stop_signals",
           "raise_outcome", "rank_name", "replica_stages"]

_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "timed out", "timeout")
"""Errors that follow another stage's failure: a peer gone, or a wait on a peer that timed out."""


@dataclass(frozen=True)
class Death:
    """A worker that died without a report (killed, out of memory, its node lost)."""

    rank: int
    pid: int | str
    cause: str
    """e.g. "killed by signal SIGKILL"."""


def replica_stages(spec: RunSpec) -> int | None:
    """The stage count when the run has replicas (ranks are then named by replica and stage),
    else None."""
    return spec.cfg.pipeline.stages if spec.cfg.pipeline.replicas > 1 else None


def rank_name(rank: int, stages: int | None) -> str:
    """``stage 1``, or with replicas (``stages`` given) ``replica 1, stage 0``."""
    if stages is None:
        return f"stage {rank}"
    replica, stage = divmod(rank, stages)
    return f"replica {replica}, stage {stage}"


def failure_report(rank: int, stage_box: list[Stage], exc: BaseException) -> dict[str, Any]:
    """Where a worker was (stage, phase, epoch, batch) when ``exc`` ended it, and its traceback."""
    stage = stage_box[0] if stage_box else None
    pos = stage.position if stage else None
    text = f"{type(exc).__name__}: {exc}"
    return {
        "rank": rank,
        "pid": os.getpid(),
        "epoch": pos.epoch if pos else -1,
        "step": pos.step if pos else -1,
        "where": stage.where() if stage else None,
        "phase": stage.phase if stage else "start-up",
        "error": text,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": isinstance(exc, PeerError)
        or any(s.lower() in text.lower() for s in _SECONDARY),
    }


def raise_outcome(reports: list[dict[str, Any]], run_dir: Path) -> None:
    """A worker's report that is a training outcome, not a crash, raised as itself: a
    non-finite loss (exit 3), a full disk (exit 2; its incomplete checkpoint removed)."""
    for r in reports:
        if r.get("type") == NonFiniteLoss.__name__:
            raise NonFiniteLoss(r["message"])
    for r in reports:
        if r.get("type") == DiskFull.__name__:
            remove_incomplete(run_dir)  # the other stages may have written into it since
            raise DiskFull(r["message"])


def _at(phase: str, where: str | None) -> str:
    """`during training at epoch 2/3, batch 4 (step 8)`, or after the last batch for the
    other phases (checkpoint, evaluation, ...)."""
    if where is None:
        return f"during {phase}"
    return f"during {phase} {'at' if phase == 'training' else 'after'} {where}"


def _doing(phase: str, where: str | None) -> str:
    """`training at epoch 2/3, batch 4 (step 8)`, `in checkpoint after ...`."""
    if phase == "training":
        return f"training at {where}" if where else "training"
    return f"in {phase} after {where}" if where else f"in {phase}"


def describe_failure(
    reports: list[dict[str, Any]],
    dead: Death | None,
    fallback: str,
    *,
    silent: dict[int, int | str] | None = None,
    progress: dict[int, tuple[str, str | None]] | None = None,
    run_dir: Path | None = None,
    stages: int | None = None,
) -> str:
    """One message for the user: the primary failure, its stage, position and original
    traceback; every position as the progress line counts (:meth:`Position.where`).

    ``silent``: {rank: pid} of workers that were alive but sent no report while the others
    gave up waiting (frozen); ``progress``: {rank: (phase, position)} each worker last told its
    launcher; ``run_dir``: to name the checkpoint to go on from; ``stages``: the stage count
    of a run with replicas (see :func:`rank_name`).
    """
    def who(rank: int) -> str:
        return rank_name(rank, stages)

    progress = progress or {}
    left = last_complete_note(run_dir) if run_dir is not None else ""
    left = f" {left[0].upper()}{left[1:]}." if left else ""
    primary = [r for r in reports if not r["secondary"]]
    if primary:
        r = min(primary, key=lambda r: r["rank"])
        return (
            f"{who(r['rank'])} (rank {r['rank']}, pid {r['pid']}) failed "
            f"{_at(r['phase'], r.get('where'))}: {r['error']}\n"
            f"--- original traceback of {who(r['rank'])} ---\n{r['traceback']}"
        )
    if dead is not None:
        return (
            f"{who(dead.rank)} (rank {dead.rank}, pid {dead.pid}) died, {dead.cause}, "
            f"{_last_seen(dead.rank, reports, progress)}; the other stages were stopped.{left}"
        )
    if silent and reports:  # alive but mute while the others timed out waiting: frozen
        rank = max(silent)  # the others waited on the last mute one
        phase = progress.get(rank, ("start-up", None))[0]
        waiting = "; ".join(f"{who(r['rank'])} {_doing(r['phase'], r.get('where'))}"
                            for r in reports)
        return (
            f"{who(rank)} (rank {rank}, pid {silent[rank]}) stopped answering, "
            f"{_last_seen(rank, reports, progress)}: it was alive but silent when the other "
            f"stages gave up waiting for it ({waiting}; pipeline.timeout_s). It was killed with "
            "the others. "
            + ("A stage still starting up may only be slow (imports, a loaded machine): "
               "raise pipeline.timeout_s." if phase == "start-up" else
               "A frozen stage is stopped (SIGSTOP, a debugger), deadlocked or stuck in a "
               "device call.")
            + left
        )
    if reports:
        r = reports[0]
        return (f"{who(r['rank'])} (rank {r['rank']}) failed {_at(r['phase'], r.get('where'))}"
                f": {r['error']}\n{r['traceback']}")
    return fallback


def _last_seen(
    rank: int, reports: list[dict[str, Any]], progress: dict[int, tuple[str, str | None]]
) -> str:
    """Where stage ``rank`` was: what it last told its launcher, else its neighbours' places."""
    if rank in progress:
        return _at(*progress[rank])
    near = [f"stage {r['rank']} was {_doing(r['phase'], r.get('where'))}" for r in reports
            if abs(r["rank"] - rank) == 1]
    return f"while {' and '.join(near)}" if near else "position unknown"


@contextlib.contextmanager
def forward_stop_signals() -> Iterator[list[int]]:
    """While supervising: the first Ctrl-C / SIGTERM asks the coordinator to checkpoint and
    stop (:func:`request_stop`); yields the count of signals so far, so that the supervisor
    aborts on the second. Outside the main thread nothing is installed (Python's rule)."""
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
        yield hits
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
