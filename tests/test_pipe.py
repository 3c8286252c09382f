"""Tests for pipelocal.pipeline.pipe: the single-process pipe (the pipeline's handle, DistPipe,
is exercised by every pipelined run in test_transparency and test_launch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelocal.engine import Engine
from pipelocal.pipeline.pipe import LocalPipe
from tests.test_engine import _batches, _blocks, _cfg


def test_local_pipe_drives_its_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(_blocks(_cfg("predsim")))
    pipe = LocalPipe(engine, eval_piece=6)
    x, y = _batches(1)[0]
    pipe.train_batch(0, 0, x, y)
    [stage] = pipe.end_epoch(0)
    assert stage["stage"] == 0 and sorted(stage["blocks"]) == [0, 1, 2, 3]
    # the figures a pipeline stage records: compute time within wall time, memory
    assert 0 < stage["busy(s)"] <= stage["wall(s)"] and stage["samples"] == 16
    assert stage["peak_rss(MiB)"] > 0
    pieces: list[int] = []  # evaluation in pieces of eval_piece rows, as over a wire
    monkeypatch.setattr(engine, "eval_batch", lambda px, py: pieces.append(len(py)))
    pipe.eval_batch(x, y)
    assert pieces == [6, 6, 4]
    monkeypatch.undo()
    pipe.eval_batch(x, y)
    assert pipe.end_eval()[3]["count"] == 16
    pipe.checkpoint(tmp_path / "ck", 1)
    assert (tmp_path / "ck" / "block_003.pt").is_file()
    pipe.close()
