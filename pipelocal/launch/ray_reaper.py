"""Nothing of a local Ray instance outlives the driver that started it, however the driver ends.

Ray's raylet and GCS share the driver's fate, but its per-node agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) notice the raylet's death only by polling and then wait on the dead
GCS: after a SIGKILL of the driver they stayed 60-120 s. So the driver starts this reaper next
to the instance, holding the write end of a pipe to it. When the pipe closes (the driver exited
or was killed), the reaper kills every process of that instance: those whose command line names
its session folder, and those started by its raylet (its children, noted while it lives, or
``RAY_RAYLET_PID`` in their environment; the agents rename themselves, so their command line
does not say), then exits.

    python pipelocal/launch/ray_reaper.py SESSION_DIR RAY_DIR RAYLET_PID   # stdin until EOF

(``RAY_DIR``: the installed ray package, which every process of the instance runs from.) It
runs as a file, not a module of the package, so that it imports nothing but the standard
library and is watching within a fraction of a second.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Reaper", "instance_pids", "start_reaper"]

_RAYLET = b"/core/src/ray/raylet/raylet"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def _processes() -> list[tuple[int, bytes]]:
    me = os.getpid()
    return [(int(e.name), _read(e / "cmdline")) for e in Path("/proc").iterdir()
            if e.name.isdigit() and int(e.name) != me]


def instance_pids(session_dir: str, ray_dir: str, raylet: int | None = None) -> list[int]:
    """Live processes of the Ray instance with this session folder (and raylet pid): Ray's
    programs naming the session, and whatever that raylet started."""
    session, package = session_dir.encode(), ray_dir.encode()
    procs = _processes()
    if raylet is None:
        raylet = next((pid for pid, cmd in procs if session in cmd and _RAYLET in cmd), None)
    env_marker = f"RAY_RAYLET_PID={raylet}".encode() if raylet is not None else None
    return [pid for pid, cmd in procs
            if (session in cmd and package in cmd)
            or (raylet is not None and _parent(pid) == raylet)  # the agents, while it lives
            or (env_marker is not None
                and env_marker in _read(Path(f"/proc/{pid}/environ")).split(b"\0"))]


def _parent(pid: int) -> int | None:
    fields = _read(Path(f"/proc/{pid}/stat")).rsplit(b")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


class Reaper:
    """The reaper process of one local Ray instance; :meth:`close` after ``ray.shutdown()``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe: the reaper kills what the shutdown left, then exits (bounded wait)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)


def _raylet(session_dir: str) -> int | None:
    return next((pid for pid, cmd in _processes()
                 if session_dir.encode() in cmd and _RAYLET in cmd), None)


def start_reaper(session_dir: str, ray_dir: str) -> Reaper:
    """Start the reaper of the local instance with ``session_dir`` (just started by this
    process, from the ray package in ``ray_dir``)."""
    raylet = _raylet(session_dir)  # found now, while it lives
    proc = subprocess.Popen(
        [sys.executable, __file__, session_dir, ray_dir, str(raylet or -1)],
        stdin=subprocess.PIPE, start_new_session=True,  # a Ctrl-C to the job is not for it
    )
    return Reaper(proc)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, who it is."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    fields = stat.rsplit(b")", 1)[-1].split()
    return fields[19].decode() if len(fields) > 19 else None


def _main(session_dir: str, ray_dir: str, raylet: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when the driver does, not before
    # While the driver lives, note the instance's processes once a second: at the end the
    # raylet may already be gone, and with it the only way to recognise its renamed agents.
    known: dict[int, str | None] = {}
    while not select.select([sys.stdin], [], [], 1.0)[0]:
        raylet = raylet or _raylet(session_dir)
        known.update((pid, _start_time(pid)) for pid in instance_pids(session_dir, ray_dir,
                                                                      raylet))
    sys.stdin.buffer.read()  # readable: the driver closed the pipe or died (EOF)
    for _ in range(3):  # again after a pause: a process the dying raylet was just starting
        fresh = instance_pids(session_dir, ray_dir, raylet)
        noted = [pid for pid, started in known.items()
                 if started is not None and _start_time(pid) == started]
        for pid in {*fresh, *noted}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
        time.sleep(0.5)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if int(sys.argv[3]) > 0 else None)
