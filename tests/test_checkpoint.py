"""Tests for pipelocal.checkpoint: atomic writes, commit, ``latest``, pruning and resolving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipelocal.checkpoint import (
    KEEP,
    CheckpointError,
    atomic_write_bytes,
    block_file,
    checkpoint_dir,
    commit_checkpoint,
    load_block_state,
    read_manifest,
    resolve_checkpoint,
    save_block_state,
)


class _Unpicklable:
    """Fails half way through torch.save, after the temporary file has been opened."""

    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


def _save(run_dir: Path, step: int, num_blocks: int = 2, commit: bool = True) -> Path:
    ckpt = checkpoint_dir(run_dir, step)
    for i in range(num_blocks):
        save_block_state(ckpt, i, {"index": i, "w": torch.full((3,), float(step))})
    if commit:
        commit_checkpoint(ckpt, {"num_blocks": num_blocks, "step": step})
    return ckpt


def test_checkpoint_and_block_file_names(tmp_path: Path) -> None:
    ckpt = checkpoint_dir(tmp_path, 120)
    assert ckpt == tmp_path / "checkpoints" / "step_00000120"
    assert block_file(ckpt, 7) == ckpt / "block_007.pt"


def test_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    save_block_state(ckpt, 0, {"w": torch.ones(2)})
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        save_block_state(ckpt, 0, {"w": torch.zeros(2), "bad": _Unpicklable()})
    assert [p.name for p in ckpt.iterdir()] == ["block_000.pt"]
    assert torch.equal(load_block_state(ckpt, 0)["w"], torch.ones(2))


def test_save_and_load_block_state(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 3, commit=False)
    state = load_block_state(ckpt, 1)
    assert state["index"] == 1 and torch.equal(state["w"], torch.full((3,), 3.0))
    with pytest.raises(CheckpointError) as err:
        load_block_state(ckpt, 5)
    assert "block 5" in str(err.value) and "block_005.pt" in str(err.value)


def test_commit_refuses_when_a_block_file_is_missing(tmp_path: Path) -> None:
    good = _save(tmp_path, 1)
    ckpt = _save(tmp_path, 2, num_blocks=2, commit=False)
    with pytest.raises(CheckpointError) as err:
        commit_checkpoint(ckpt, {"num_blocks": 3, "step": 2})
    assert "[2]" in str(err.value) and str(ckpt) in str(err.value)
    assert not (ckpt / "manifest.json").exists()
    assert resolve_checkpoint(tmp_path) == good  # latest did not move
    assert isinstance(err.value, FileNotFoundError)  # what the CLI reports with exit code 2


def test_latest_points_at_the_newest_and_only_the_last_two_are_kept(tmp_path: Path) -> None:
    assert KEEP == 2
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt = _save(tmp_path, step)
        assert (root / "latest").read_text() == ckpt.name
        assert resolve_checkpoint(tmp_path) == ckpt
        assert read_manifest(tmp_path)["step"] == step
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert not any(p.name.endswith(".tmp") for p in root.rglob("*"))


def test_incomplete_checkpoints_are_neither_counted_nor_pruned(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    partial = _save(tmp_path, 2, commit=False)  # e.g. killed while writing
    newest = _save(tmp_path, 3)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000001", "step_00000002", "step_00000003"]
    assert resolve_checkpoint(tmp_path) == newest
    with pytest.raises(CheckpointError):
        resolve_checkpoint(partial)


def test_resolve_accepts_run_dir_checkpoints_dir_and_step_dir(tmp_path: Path) -> None:
    _save(tmp_path, 5)
    newest = _save(tmp_path, 6)
    older = checkpoint_dir(tmp_path, 5)
    assert resolve_checkpoint(tmp_path) == newest
    assert resolve_checkpoint(str(tmp_path / "checkpoints")) == newest
    assert resolve_checkpoint(newest) == newest
    assert resolve_checkpoint(older) == older  # an explicit older checkpoint wins over latest
    assert read_manifest(older) == {"num_blocks": 2, "step": 5}
    assert json.loads((newest / "manifest.json").read_text())["step"] == 6


@pytest.mark.parametrize("where", ["empty", "missing", "file"])
def test_resolve_errors_clearly_otherwise(tmp_path: Path, where: str) -> None:
    path = {"empty": tmp_path, "missing": tmp_path / "nope", "file": tmp_path / "x.pt"}[where]
    if where == "file":
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "manifest.json" in msg
    assert "run directory" in msg and "checkpoints/step_*" in msg


def test_checkpoint_files_are_readable_by_teammates(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; a checkpoint on a shared file system must be 0644 (umask)."""
    ckpt = _save(tmp_path, 1)
    mask = os.umask(0)
    os.umask(mask)
    for f in (block_file(ckpt, 0), ckpt / "manifest.json", ckpt.parent / "latest"):
        assert f.stat().st_mode & 0o777 == 0o644 & ~mask, f
