"""Checkpoints: one file per block plus a manifest, so a run saved with S stages resumes with any S.

Layout of a run directory::

    runs/<name>/checkpoints/step_00000120/block_000.pt ... block_007.pt manifest.json
    runs/<name>/checkpoints/latest            # name of the newest complete checkpoint

Every file is written to a temporary name and renamed into place. A checkpoint counts only once
its manifest exists, and ``latest`` moves only after that, so an interrupted write (Ctrl-C, a
killed worker, a full disk) always leaves the previous checkpoint usable. The manifest holds the
sha256 of every block file as it was written; loading a block checks it, so a file damaged in
place is refused like a truncated one, and the error offers the newest checkpoint that verifies.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "DiskFull",
    "atomic_write_bytes",
    "block_file",
    "checkpoint_dir",
    "commit_checkpoint",
    "last_complete_note",
    "load_block_state",
    "locate_full",
    "read_manifest",
    "remove_incomplete",
    "resolve_checkpoint",
    "save_block_state",
    "verify_checkpoint",
]

KEEP = 2
"""Complete checkpoints kept per run (the newest ones)."""


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing or damaged; the message names the file and what to do."""


class DiskFull(CheckpointError):
    """A checkpoint file could not be written: no space left (or the quota is used up)."""

    located = False
    """True once the message says where the run was and what is left (:func:`locate_full`)."""


def locate_full(exc: DiskFull, where: str | None, run_dir: Path, step: int) -> DiskFull:
    """The one-line message of a full disk: the file, the bytes, where the run was, the
    checkpoint to go on from. Removes the incomplete step folders first."""
    if exc.located:
        return exc
    remove_incomplete(run_dir)
    after = f", after {where}" if where else ""
    full = DiskFull(
        f"{exc} (checkpoint step_{step:08d}{after}); the incomplete checkpoint was removed and "
        f"{last_complete_note(run_dir)}: free some space or set run.out_dir to a larger disk")
    full.located = True
    return full


_FILE_MODE = 0o644
"""Checkpoint files are readable by the group and others, like the rest of a run directory
(``mkstemp`` creates them 0600, which hides them from teammates on a shared file system)."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        _raise_if_full(exc, path, len(data))
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk may show only here (or at close)
        os.chmod(tmp, _FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_if_full(exc, path, len(data))
        raise


def _raise_if_full(exc: OSError, path: Path, needed: int) -> None:
    if exc.errno not in _NO_SPACE:
        return
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
        have = f", {free:,} are free"
    except OSError:
        have = ""
    raise DiskFull(f"{os.strerror(exc.errno).lower()} in {path.parent}: {path.name} needs "
                   f"{needed:,} bytes{have}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), data)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def block_file(ckpt: Path, index: int) -> Path:
    return Path(ckpt) / f"block_{index:03d}.pt"


def save_block_state(ckpt: Path, index: int, state: dict[str, Any]) -> str:
    """Write one block's state; returns the sha256 (hex) of the bytes written."""
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised in memory first: its size is known before writing
    data = buffer.getvalue()
    _atomic(block_file(ckpt, index), data)
    return hashlib.sha256(data).hexdigest()


def load_block_state(ckpt: Path, index: int) -> dict[str, Any]:
    """One block's state, after checking its file against the manifest's sha256."""
    path = block_file(ckpt, index)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no state for block {index} ({path})"
                              + _fallback_hint(ckpt))
    data = path.read_bytes()
    _check_sha(path, ckpt, hashlib.sha256(data).hexdigest())
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, pickle/EOF/zip errors: all "damaged"
        raise CheckpointError(_damaged(path, ckpt, exc)) from exc


def verify_checkpoint(ckpt: Path, num_blocks: int) -> None:
    """Check every block file of ``ckpt`` (its sha256, then that torch can read it), before any
    worker loads it. Memory-mapped, so torch reads only the pickled structure."""
    for index in range(num_blocks):
        path = block_file(ckpt, index)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no state for block {index} ({path})"
                                  + _fallback_hint(ckpt))
        _check_sha(path, ckpt, _file_sha256(path))
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # damaged: truncated, overwritten, not a torch file
            raise CheckpointError(_damaged(path, ckpt, exc)) from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_sha(ckpt: Path) -> dict[str, str]:
    """{file name: sha256} from the manifest (empty for checkpoints written without them)."""
    try:
        manifest = json.loads((Path(ckpt) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    sha = manifest.get("sha256") if isinstance(manifest, dict) else None
    return sha if isinstance(sha, dict) else {}


def _check_sha(path: Path, ckpt: Path, actual: str) -> None:
    want = _recorded_sha(ckpt).get(path.name)
    if want is not None and want != actual:
        raise CheckpointError(_damaged(
            path, ckpt, f"its sha256 {actual[:12]}... differs from the {want[:12]}... recorded "
                        "in manifest.json when it was written"))


def _damaged(path: Path, ckpt: Path, exc: BaseException | str) -> str:
    text = str(exc)
    reason = text.splitlines()[0] if text else type(exc).__name__
    return f"checkpoint file {path} is damaged ({reason})." + _fallback_hint(ckpt)


def _verifies(ckpt: Path) -> bool:
    """A complete checkpoint whose block files all exist and match their sha256 (if recorded)."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = [block_file(ckpt, i) for i in range(int(manifest["num_blocks"]))]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    sha = _recorded_sha(ckpt)
    return all(f.is_file() and (f.name not in sha or _file_sha256(f) == sha[f.name])
               for f in files)


def _newest_verifying(root: Path, *, below: str | None = None) -> Path | None:
    """The newest checkpoint in ``root`` (older than step folder ``below``) that verifies."""
    for p in sorted(Path(root).glob("step_*"), reverse=True):
        if (below is None or p.name < below) and _verifies(p):
            return p
    return None


def _fallback_hint(ckpt: Path, *, older_only: bool = True) -> str:
    """What to do about damaged or missing checkpoint ``ckpt``: the newest (older) one in its
    folder that verifies, if any."""
    ckpt = Path(ckpt)
    good = _newest_verifying(ckpt.parent, below=ckpt.name if older_only else None)
    return _offer(good, older_only)


def _offer(good: Path | None, older: bool) -> str:
    if good is None:
        return " No other complete checkpoint verifies; start the run again."
    return (f" The newest {'older ' if older else ''}complete checkpoint that verifies is "
            f"{good}: resume from it with --resume {good} (or evaluate it with pipelocal eval "
            f"{good})")


def last_complete_note(run_dir: Path | None) -> str:
    """For messages after a failure: which checkpoint to go on from, or that there is none."""
    root = Path(run_dir) / "checkpoints" if run_dir is not None else None
    good = _newest_verifying(root) if root is not None and root.is_dir() else None
    if good is None:
        return "no complete checkpoint was written, so the run has to start again"
    return f"the last complete checkpoint is {good} (resume with --resume {run_dir})"


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete the step folders that have no manifest (a write that failed or was cut short);
    returns them. Complete checkpoints are never touched."""
    removed = [p for p in sorted((Path(run_dir) / "checkpoints").glob("step_*"))
               if p.is_dir() and not (p / "manifest.json").is_file()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def commit_checkpoint(ckpt: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (after every block file exists), move ``latest``, prune old ones."""
    ckpt = Path(ckpt)
    missing = [i for i in range(manifest["num_blocks"]) if not block_file(ckpt, i).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is missing block files {missing}")
    atomic_write_bytes(ckpt / "manifest.json", json.dumps(manifest, indent=1).encode())
    root = ckpt.parent
    atomic_write_bytes(root / "latest", ckpt.name.encode())
    complete = sorted(p for p in root.glob("step_*") if (p / "manifest.json").is_file())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its ``checkpoints`` folder or one checkpoint -> that checkpoint's folder."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            p = root / latest.read_text().strip()
            if not (p / "manifest.json").is_file():
                state = "has no manifest.json" if p.is_dir() else "does not exist"
                raise CheckpointError(
                    f"{latest} names {p.name}, which {state} (removed, or its write was cut "
                    "short)." + _fallback_hint(p, older_only=False))
            return p
    if not (p / "manifest.json").is_file():
        found = (_newest_verifying(r) for r in (p / "checkpoints", p, p.parent) if r.is_dir())
        good = next((g for g in found if g is not None), None)
        hint = _offer(good, older=False) if good is not None else ""
        raise CheckpointError(
            f"no complete checkpoint at {path} (looked for manifest.json in {p}); pass a run "
            "directory, its checkpoints/ folder or a checkpoints/step_* folder." + hint
        )
    return p


def read_manifest(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    file = ckpt / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and bad UTF-8
        raise CheckpointError(_damaged(file, ckpt, exc)) from exc
    return manifest
