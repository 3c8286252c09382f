"""The stop request of a run: the flag the training loop polls, the signal handlers and stop file
that set it, and a child process's death with its parent.

Ctrl-C / SIGTERM (or a supervisor's stop file) ask the loop to checkpoint at the current step and
stop; a stop during set-up raises :class:`Interrupted`. :func:`die_with_parent` has the kernel
end a worker whose launcher was killed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "Interrupted",
    "check_not_stopped",
    "clear_stop",
    "die_with_parent",
    "end_process",
    "exit_on_stop_signals",
    "install_stop_handlers",
    "request_stop",
    "stop_requested",
    "watch_stop_file",
]

_PR_SET_PDEATHSIG = 1
_STOP = threading.Event()
_STOP_FILE: list[Path] = []  # set by a supervising launcher that cannot signal us safely


def request_stop() -> None:
    """Ask the training loop to checkpoint and stop after the current step."""
    _STOP.set()


def clear_stop() -> None:
    """A new run starts: forget an earlier run's stop request and stop file."""
    _STOP.clear()
    _STOP_FILE.clear()


def watch_stop_file(path: Path) -> None:
    """Also stop once ``path`` exists (how the spawn supervisor forwards Ctrl-C / SIGTERM)."""
    _STOP_FILE[:] = [Path(path)]


def stop_requested() -> bool:
    if not _STOP.is_set() and _STOP_FILE and _STOP_FILE[0].exists():  # one stat() per batch
        _STOP.set()
    return _STOP.is_set()


def install_stop_handlers(*, announce: bool = True, same_within_s: float = 0.0) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes, docker stop): checkpoint at the current
    step, then stop; a second one stops at once.

    ``announce``: print the notice (one process of a job does). ``same_within_s``: a second
    signal this soon after the first is the same request, forwarded (torchrun's agent passes on
    the signal that the terminal or Slurm also sent to every process).
    """
    first: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            if first and time.monotonic() - first[0] < same_within_s:
                return
            raise KeyboardInterrupt
        first.append(time.monotonic())
        if announce:
            name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
            print(f"\n{name}: writing a checkpoint, then stopping (Ctrl-C again to abort)",
                  flush=True)
        _STOP.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def exit_on_stop_signals(code: int) -> None:
    """The command's outcome is decided: a later SIGINT / SIGTERM (a Ctrl-C pressed while the
    process reports and shuts down) exits at once with ``code`` instead of raising
    KeyboardInterrupt outside any handler, which would end the process by the signal."""

    def handler(signum: int, frame: Any) -> None:
        _exit_now(code)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def end_process(code: int) -> NoReturn:
    """End this process with ``code`` once its command is done: the exit functions run (a
    SIGINT / SIGTERM during them exits with ``code`` at once, see :func:`exit_on_stop_signals`),
    the standard streams are flushed, and the process exits without the interpreter's own
    teardown, during which Python no longer handles signals, so that a Ctrl-C then would end
    the process by the signal instead of with its status. The kernel frees its memory."""
    exit_on_stop_signals(code)
    atexit._run_exitfuncs()
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Flush what the command printed, then exit with ``code`` at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):  # a write under way, a closed pipe
            pass
    os._exit(code)


def die_with_parent(launcher: int) -> None:
    """Have this process SIGKILLed when ``launcher`` dies (Linux); exit if it already has.

    ``launcher`` is the parent, or the process whose forkserver the parent is. The kernel
    signals a child when its parent dies (``PR_SET_PDEATHSIG``); a forkserver outlives its
    launcher while any of its children holds the server's pipe, so a forkserver child also
    watches the launcher itself, from a thread blocked on the launcher's pidfd."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own clean-up still applies
        return
    if os.getppid() == launcher:
        return
    try:
        pidfd = os.pidfd_open(launcher)
    except (OSError, AttributeError):  # gone already (or no pidfd: Linux < 5.3)
        if not _alive(launcher):
            os._exit(1)
        pidfd = None
    threading.Thread(target=_die_with, args=(launcher, pidfd), daemon=True,
                     name="pipelocal-die-with-launcher").start()


def _die_with(launcher: int, pidfd: int | None) -> None:
    """Block until ``launcher`` exits (readable pidfd, or a poll twice a second), then die."""
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        while _alive(launcher):
            time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed parent not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


class Interrupted(RuntimeError):
    """The run was stopped by Ctrl-C / SIGTERM before it could checkpoint: during set-up, or
    aborted by a second one."""


def check_not_stopped() -> None:
    """Ctrl-C / SIGTERM during set-up: stop before any worker starts (nothing to checkpoint)."""
    if stop_requested():
        raise Interrupted("stopped during set-up, before training started; nothing was "
                          "trained, so no checkpoint was written")
