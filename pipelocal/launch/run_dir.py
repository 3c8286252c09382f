"""Run directories: one run owns a run directory at a time, and a new run never writes into
one that holds another run's files unless told to replace them.

:func:`make_run_dir` creates (named) or newly claims (unnamed) the directory;
:func:`lock_run_dir` owns it for the run with an exclusive ``flock`` that the kernel drops when
the process exits; :func:`check_fresh` (before validation) and :func:`check_fresh_locked` (under
the lock) refuse a directory that holds another run, or clear it for ``run.resume =
"overwrite"``; :func:`open_run_dir` does all of that and writes the run's config.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from pipelocal.checkpoint import CheckpointError, resolve_checkpoint
from pipelocal.config import Config, ConfigError, to_toml

__all__ = [
    "check_fresh",
    "check_fresh_locked",
    "lock_run_dir",
    "make_run_dir",
    "open_run_dir",
    "release_run_dir",
]

_LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}
"""Run directory -> file descriptor of its lock file, for the run this process launched."""


def make_run_dir(cfg: Config) -> Path:
    """Create (named) or newly claim (unnamed) the run directory; an unnamed run never shares
    one: two started in the same second get ``<stamp>`` and ``<stamp>-1``."""
    out = Path(cfg.run.out_dir)
    try:
        if cfg.run.name:
            run_dir = out / cfg.run.name
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_dir
        out.mkdir(parents=True, exist_ok=True)
        stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), 0
        while True:  # mkdir is atomic: exactly one run creates each name
            run_dir = out / (stamp if suffix == 0 else f"{stamp}-{suffix}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                suffix += 1
    except OSError as exc:
        raise ConfigError(
            f"cannot create a run directory in run.out_dir = {str(out)!r}: "
            f"{exc.strerror or exc}; set run.out_dir to a writable folder"
        ) from exc


def lock_run_dir(run_dir: Path) -> None:
    """Own ``run_dir`` for this run: an exclusive ``flock`` on its lock file.

    The kernel drops the lock when this process exits, however it exits, so a lock left by a
    killed run is never stale. Worker processes do not inherit it (spawned, not forked).
    """
    path = run_dir / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write to the run directory {run_dir}: "
                          f"{exc.strerror or exc}; set run.out_dir to a writable folder") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"run directory {run_dir} is in use by another run (pid {holder}); wait for it to "
            "end, stop it, or choose another run.name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[run_dir] = fd


def release_run_dir(run_dir: Path | None = None) -> None:
    """Give up the lock on ``run_dir`` (every run directory this process holds when None)."""
    for held in [run_dir] if run_dir is not None else list(_HELD):
        fd = _HELD.pop(held, None) if held is not None else None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


_RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoints")
"""What makes a folder a run directory that holds a run (an empty one, or one with only the
lock file, is free)."""


def _held_run(run_dir: Path) -> str | None:
    """What ``run_dir`` holds of an earlier run, for the refusal; None if nothing."""
    found = [name for name in _RUN_FILES if (run_dir / name).exists()]
    if not found:
        return None
    try:
        ckpt = resolve_checkpoint(run_dir)
        return f"{', '.join(found)}; latest checkpoint {ckpt.name}"
    except CheckpointError:
        return ", ".join(found)


def check_fresh(cfg: Config) -> None:
    """A new named run must not write into a directory that holds another run (its pruning
    would delete the new run's checkpoints): refused unless ``run.resume = "overwrite"``, or
    ``"auto"`` found no checkpoint to continue. A directory in use is refused either way."""
    if not cfg.run.name:
        return  # an unnamed run always gets a new directory
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if not run_dir.is_dir():
        return
    lock_run_dir(run_dir)  # raises if another run owns it now
    release_run_dir(run_dir)
    held = _held_run(run_dir)
    if held is None or cfg.run.resume in ("overwrite", "auto"):
        return
    raise _holds_another(run_dir, held)


def _holds_another(run_dir: Path, held: str) -> ConfigError:
    return ConfigError(
        f"run directory {run_dir} already holds another run ({held}); continue it with "
        f"--resume {run_dir}, choose a fresh run.name, or replace it with --overwrite "
        "(= --set run.resume=overwrite)"
    )


def _clear_run_dir(run_dir: Path) -> None:
    """``run.resume = overwrite`` (or auto without a checkpoint): the earlier run's files go."""
    for entry in run_dir.iterdir():
        if entry.name == _LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_run_dir(cfg: Config, resumed: Path | None = None) -> tuple[Path, Config]:
    """Create and lock the run directory (a resumed run keeps its own, ``resumed``), write the
    config into it; returns the directory and the config as written."""
    run_dir = resumed if resumed is not None else make_run_dir(cfg)
    lock_run_dir(run_dir)
    try:
        if resumed is None and cfg.run.name:
            cfg = check_fresh_locked(run_dir, cfg)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    except OSError as exc:
        release_run_dir(run_dir)
        raise ConfigError(f"cannot write {run_dir / 'config.toml'}: "
                          f"{exc.strerror or exc}; set run.out_dir to a writable folder") from exc
    return run_dir, cfg


def check_fresh_locked(run_dir: Path, cfg: Config) -> Config:
    """Under the lock: refuse a directory that holds another run (it may have appeared since
    :func:`check_fresh`), or clear it when the config says so; returns the config to write into
    the run directory, which then says ``never`` (a copy of it must not overwrite again)."""
    how = cfg.run.resume
    held = _held_run(run_dir)
    if held is None:
        return cfg
    if how == "never":
        raise _holds_another(run_dir, held)
    _clear_run_dir(run_dir)
    return cfg.replace(run={"resume": "never"}) if how == "overwrite" else cfg
