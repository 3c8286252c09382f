"""Tests for pipelocal.pipeline.pipe: the single-process pipe (the pipeline's handle, DistPipe,
is exercised by every pipelined run in test_transparency and test_launch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelocal.engine import Engine
from pipelocal.microbatch import MicroBatch, split_batch
from pipelocal.pipeline.ideal import LastBatch
from pipelocal.pipeline.pipe import LocalPipe
from tests.test_engine import _assert_same_block, _batches, _blocks, _cfg


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


def test_measuring_the_ideal_leaves_the_training_state_as_it_was() -> None:
    """Extra steps on the last batch, then restored: the next batch trains exactly as in a run
    that never measured (parameters, batch-norm buffers, Adam state, dropout generator)."""
    batches = _batches(3)
    measured = LocalPipe(Engine(_blocks(_cfg("predsim"))), eval_piece=16)
    straight = LocalPipe(Engine(_blocks(_cfg("predsim"))), eval_piece=16)
    for pipe in (measured, straight):
        for step, (x, y) in enumerate(batches[:2]):
            pipe.train_batch(step, 0, x, y)
        pipe.end_epoch(0)
    [ideal] = measured.measure_ideal(4)
    assert ideal["stage"] == 0 and ideal["ideal_step(s)"] > 0
    for pipe in (measured, straight):
        pipe.train_batch(2, 1, *batches[2])
    [a], [b] = measured.end_epoch(1), straight.end_epoch(1)
    assert a["blocks"] == b["blocks"]  # the extra steps' losses are not counted
    for block_a, block_b in zip(measured.engine.blocks, straight.engine.blocks):
        _assert_same_block(block_a, block_b)


def test_the_last_batch_replays_copies_of_its_micro_batches() -> None:
    """A stage keeps copies (its receive buffers are reused) of every micro-batch of the
    batch, and replays them in order as one training step; half a batch is refused."""
    x, y = _batches(1)[0]
    parts = list(split_batch((x.clone(), y.clone()), 2))
    kept, replayed, reference = LastBatch(), Engine(_blocks(_cfg("pred"))), Engine(
        _blocks(_cfg("pred")))
    for part, (px, py) in parts:
        replayed.train_micro(px, py, 0, part=part)
        kept.keep(px, py, None, part, 0)
        px.fill_(float("nan"))  # the receive buffer, overwritten by the next message
    kept.replay(replayed)
    for _ in range(2):
        for part, (px, py) in split_batch((x, y), 2):
            reference.train_micro(px, py, 0, part=part)
    for block_a, block_b in zip(replayed.blocks, reference.blocks):
        _assert_same_block(block_a, block_b)
    half = LastBatch()
    part, (px, py) = parts[0]
    half.keep(px, py, None, part, 0)
    with pytest.raises(RuntimeError, match="has not trained a whole batch"):
        half.replay(replayed)


def test_the_last_batch_is_not_an_epochs_short_one() -> None:
    """An epoch's short last batch would time a smaller step: the full one before it stays."""
    (x, y), (sx, sy) = _batches(1)[0], _batches(1, size=5)[0]
    kept = LastBatch()
    kept.keep(x, y, None, MicroBatch(), 0)
    kept.keep(sx, sy, None, MicroBatch(), 0)
    assert kept.rows == 16 and torch.equal(kept.parts[0].x, x)
    kept.keep(x + 1, y, None, MicroBatch(), 1)  # the next epoch's first batch
    assert kept.epoch == 1 and torch.equal(kept.parts[0].x, x + 1)
