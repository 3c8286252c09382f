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
from typing import Any

from pipelocal.pipeline.channel import PeerError
from pipelocal.pipeline.stage import Stage
from pipelocal.trainer import request_stop

__all__ = ["Death", "describe_failure", "failure_report", "forward_stop_signals"]

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


def failure_report(rank: int, stage_box: list[Stage], exc: BaseException) -> dict[str, Any]:
    """Where a worker was (stage, phase, epoch, batch) when ``exc`` ended it, and its traceback."""
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


def describe_failure(
    reports: list[dict[str, Any]],
    dead: Death | None,
    fallback: str,
    *,
    silent: dict[int, int | str] | None = None,
    phases: dict[int, tuple[str, int, int]] | None = None,
) -> str:
    """One message for the user: the primary failure, its stage, batch and original traceback.

    ``silent``: {rank: pid} of workers that were alive but sent no report while the others
    gave up waiting (frozen); ``phases``: the last phase each worker announced.
    """
    primary = [r for r in reports if not r["secondary"]]
    if primary:
        r = min(primary, key=lambda r: r["rank"])
        where = f"epoch {r['epoch']}, batch {r['step']}" if r["step"] >= 0 else r["phase"]
        return (
            f"stage {r['rank']} (rank {r['rank']}, pid {r['pid']}) failed at {where}: "
            f"{r['error']}\n--- original traceback of stage {r['rank']} ---\n{r['traceback']}"
        )
    if dead is not None:
        return (
            f"stage {dead.rank} (rank {dead.rank}, pid {dead.pid}) died, {dead.cause}"
            f"{_near(dead.rank, reports)}; the other stages were stopped. The last complete "
            "checkpoint is still usable."
        )
    if silent and reports:  # alive but mute while the others timed out waiting: frozen
        rank = max(silent)  # the others waited on the last mute one
        phase, epoch, step = (phases or {}).get(rank, ("start-up", -1, -1))
        since = f" (since epoch {epoch + 1}, batch {step})" if step >= 0 else ""
        waiting = "; ".join(f"stage {r['rank']} in {r['phase']}" for r in reports)
        return (
            f"stage {rank} (rank {rank}, pid {silent[rank]}) stopped answering during {phase}"
            f"{since}{_near(rank, reports)}: it was alive but silent when the other stages gave "
            f"up waiting for it ({waiting}; pipeline.timeout_s). It was killed with the others. "
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
    return fallback


def _near(rank: int, reports: list[dict[str, Any]]) -> str:
    """Where stage ``rank`` was, from its neighbours: the stages after it had finished the
    batches before the lost one, the stages before it had sent it."""
    down = [r["step"] + 1 for r in reports if r["rank"] > rank and r["step"] >= 0]
    up = [r["step"] for r in reports if r["rank"] < rank and r["step"] >= 0]
    if not (down or up):
        return ""
    lo, hi = (max(down) if down else 0), (max(up) if up else max(down))
    return f" at batch {lo}" if lo >= hi else f" between batches {lo} and {hi}"


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
