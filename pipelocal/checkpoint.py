"""Checkpoints: one file per block plus a manifest, so a run saved with S stages resumes with any S.

Layout of a run directory::

    runs/<name>/checkpoints/step_00000120/block_000.pt ... block_007.pt manifest.json
    runs/<name>/checkpoints/latest            # name of the newest complete checkpoint

Every file is written to a temporary name and renamed into place. A checkpoint counts only once
its manifest exists, and ``latest`` moves only after that, so an interrupted write (Ctrl-C, a
killed worker) always leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "block_file",
    "checkpoint_dir",
    "commit_checkpoint",
    "load_block_state",
    "read_manifest",
    "resolve_checkpoint",
    "save_block_state",
    "verify_checkpoint",
]

KEEP = 2
"""Complete checkpoints kept per run (the newest ones)."""


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing or damaged; the message names the file and what to do."""


_FILE_MODE = 0o644
"""Checkpoint files are readable by the group and others, like the rest of a run directory
(``mkstemp`` creates them 0600, which hides them from teammates on a shared file system)."""


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def block_file(ckpt: Path, index: int) -> Path:
    return Path(ckpt) / f"block_{index:03d}.pt"


def save_block_state(ckpt: Path, index: int, state: dict[str, Any]) -> None:
    _atomic(block_file(ckpt, index), lambda f: torch.save(state, f))


def load_block_state(ckpt: Path, index: int) -> dict[str, Any]:
    path = block_file(ckpt, index)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no state for block {index} ({path})")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, pickle/EOF/zip errors: all "damaged"
        raise CheckpointError(_damaged(path, ckpt, exc)) from exc


def verify_checkpoint(ckpt: Path, num_blocks: int) -> None:
    """Check that every block file of ``ckpt`` can be read, before any worker loads it.

    Memory-mapped, so only the pickled structure is read, not every tensor's bytes.
    """
    for index in range(num_blocks):
        path = block_file(ckpt, index)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no state for block {index} ({path})"
                                  + _older_hint(ckpt))
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # damaged: truncated, overwritten, not a torch file
            raise CheckpointError(_damaged(path, ckpt, exc)) from exc


def _damaged(path: Path, ckpt: Path, exc: BaseException) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"checkpoint file {path} is damaged ({reason})." + _older_hint(ckpt)


def _older_hint(ckpt: Path) -> str:
    """What to do about a damaged checkpoint: resume from an older complete one, if any."""
    older = [p for p in sorted(Path(ckpt).parent.glob("step_*"), reverse=True)
             if p.name < Path(ckpt).name and _manifest_ok(p)]
    if older:
        return (f" An older complete checkpoint exists: resume from it with "
                f"--resume {older[0]}")
    return " No older complete checkpoint exists; start the run again."


def _manifest_ok(ckpt: Path) -> bool:
    try:
        json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return True


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
            break
    if not (p / "manifest.json").is_file():
        raise CheckpointError(
            f"no complete checkpoint at {path} (looked for manifest.json in {p}); pass a run "
            "directory, its checkpoints/ folder or a checkpoints/step_* folder"
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
