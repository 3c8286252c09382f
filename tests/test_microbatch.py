"""Tests for pipelocal.microbatch and micro-batched training: the split, the update it gives
(the batch mean's up to summation order), the per-batch statistics, the order in which blocks
and stages see the micro-batches, and the refusal of rules that couple a batch's samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipelocal.config import ConfigError, load_config
from pipelocal.engine import Engine, LocalBlock, build_blocks
from pipelocal.launch import train
from pipelocal.microbatch import WHOLE, MicroBatch, micro_batch_sizes, split_batch, wire_rows
from pipelocal.models import build_model
from pipelocal.pipeline.channel import Kind, Message
from pipelocal.pipeline.pipe import DistPipe
from pipelocal.pipeline.stage import Stage
from pipelocal.rules import RULES, check_micro_batches
from tests.conftest import assert_identical, tiny_config

NUM_CLASSES = 10
SHAPE = (1, 8, 8)


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize(("rows", "m", "sizes"), [
    (10, 4, [3, 3, 2, 2]), (8, 2, [4, 4]), (7, 2, [4, 3]), (5, 1, [5]), (3, 8, [1, 1, 1]),
    (1, 4, [1]), (0, 3, []), (64, 3, [22, 21, 21]),
])
def test_micro_batch_sizes(rows: int, m: int, sizes: list[int]) -> None:
    assert micro_batch_sizes(rows, m) == sizes


def test_micro_batch_sizes_are_as_even_as_rows_allow() -> None:
    for rows in range(0, 40):
        for m in range(1, 12):
            sizes = micro_batch_sizes(rows, m)
            assert sum(sizes) == rows and len(sizes) == min(m, rows)
            assert all(s >= 1 for s in sizes) and sizes == sorted(sizes, reverse=True)
            assert not sizes or max(sizes) - min(sizes) <= 1
            # the wire of a batch size >= rows holds every micro-batch
            assert all(s <= wire_rows(b, m) for s in sizes for b in range(max(rows, 1), 41))
    with pytest.raises(ValueError, match="micro_batches = 0"):
        micro_batch_sizes(4, 0)


def test_split_batch_gives_row_slices_and_their_parts() -> None:
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    parts = list(split_batch((x, y, None), 4))
    assert [p for p, _ in parts] == [MicroBatch(i, 4, 10) for i in range(4)]
    assert torch.equal(torch.cat([t[0] for _, t in parts]), x)
    assert [t[1].tolist() for _, t in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert all(t[2] is None for _, t in parts)
    assert sum(p.weight(len(t[1])) for p, t in parts) == pytest.approx(1.0)
    [(whole, same)] = split_batch((x, y), 1)  # M = 1: the batch itself, untouched
    assert whole == WHOLE and same[0] is x and whole.weight(10) == 1.0
    [(one, _)] = split_batch((x[:1], y[:1]), 4)  # one row: one micro-batch, the whole batch
    assert one.whole


# --------------------------------------------------------------------------- the update


def _cfg(rule: str, micro_batches: int, *extra: str) -> Any:
    """The MLP without batch statistics or dropout: only summation order depends on M. SGD
    with momentum: Adam divides each gradient by its own magnitude, so a gradient that is
    zero up to rounding (a bpf bias at zero-initialised weights) becomes a step of rounding
    noise of about lr / 10, whatever the summation order."""
    return load_config(None, [
        "model.name=mlp", "model.hidden=32", "model.depth=2", "model.batchnorm=false",
        "model.dropout=0.0", f"rule.name={rule}", "optim.name=sgd", "optim.lr=0.05",
        "optim.momentum=0.9",
        f"pipeline.micro_batches={micro_batches}", *extra,
    ])


def _engine(cfg: Any) -> Engine:
    specs = build_model(cfg.model, SHAPE, NUM_CLASSES)
    blocks = build_blocks(cfg, specs, NUM_CLASSES, range(len(specs)), "cpu")
    return Engine(blocks, micro_batches=cfg.pipeline.micro_batches)


def _batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, *SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (n,),
                                                                 generator=g)) for n in sizes]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("rule", ["pred", "sym", "pred-bpf", "glob"])
def test_micro_batches_give_the_batch_update_up_to_summation_order(rule: str, m: int) -> None:
    """M micro-batches weighted by rows / B accumulate the gradient of the batch mean, so the
    parameters after a few SGD steps match M = 1 to float32 rounding (rtol 1e-4, atol 1e-6),
    not bitwise: the batch's per-sample terms are summed in another order (per micro-batch,
    then across them) and matrix products of other shapes round differently. Batches of 10
    rows and a short last one of 7 split unevenly (M = 4: 3, 3, 2, 2 and 2, 2, 2, 1), so a
    wrong weight (1 / M instead of rows / B) shows; so do the per-batch statistics."""
    whole, micro = _engine(_cfg(rule, 1)), _engine(_cfg(rule, m))
    for epoch, (x, y) in enumerate(_batches([10, 10, 10, 7])):
        out_whole = whole.train_batch(x, y, epoch)
        torch.testing.assert_close(micro.train_batch(x, y, epoch), out_whole, rtol=1e-4,
                                   atol=1e-5)
    for a, b in zip(whole.blocks, micro.blocks):
        sa, sb = a.state_dict(), b.state_dict()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-6, msg=key)
    stats_whole, stats_micro = whole.pop_train_stats(), micro.pop_train_stats()
    for i, sw in stats_whole.items():
        sm = stats_micro[i]
        assert sm["loss"] == pytest.approx(sw["loss"], rel=1e-5)  # row-weighted means
        assert sm["nonfinite_at"] is sw["nonfinite_at"] is None
        assert (sm["acc"] is None) == (sw["acc"] is None)


def test_one_optimiser_step_per_batch_after_its_last_micro_batch() -> None:
    engine = _engine(_cfg("pred", 4, "optim.name=adam"))  # Adam counts its steps
    for epoch, (x, y) in enumerate(_batches([10, 7, 3])):
        engine.train_batch(x, y, epoch)
    for block in engine.blocks:
        steps = {int(s["step"]) for s in block.optimizer.state.values()}
        assert steps == {3}, (block.index, steps)


def test_a_nonfinite_micro_batch_names_its_batch() -> None:
    engine = _engine(_cfg("pred", 2))
    (x0, y0), (x1, y1) = _batches([8, 8])
    x1 = x1.clone()
    x1[6] = float("nan")  # in the second micro-batch of the second batch
    engine.train_batch(x0, y0, 0)
    engine.train_batch(x1, y1, 0)
    assert engine.pop_train_stats()[0]["nonfinite_at"] == 1


def _record_order(blocks: list[LocalBlock], trace: list[tuple[int, int]]) -> None:
    for block in blocks:
        block.body.register_forward_hook(
            lambda mod, inp, out, i=block.index: trace.append((i, int(inp[0].shape[0]))))


def test_each_micro_batch_passes_every_block_before_the_next_starts() -> None:
    engine = _engine(_cfg("pred", 4))
    trace: list[tuple[int, int]] = []
    _record_order(engine.blocks, trace)
    x, y = _batches([10])[0]
    out = engine.train_batch(x, y, 0)
    assert out.shape[0] == 10  # the micro-batches' outputs, concatenated
    assert trace == [(b, n) for n in (3, 3, 2, 2) for b in range(3)]


# --------------------------------------------------------------------------- a pipeline stage


class _Outbox:
    """Records what a stage sends, and when (a trace shared with the engine's hooks)."""

    def __init__(self, trace: list[Any]) -> None:
        self.trace, self.sent = trace, []

    def send(self, msg: Message) -> None:
        self.trace.append(("send", msg.part.index, msg.rows))
        self.sent.append(Message(msg.kind, msg.step, msg.epoch, msg.x.clone(), msg.y.clone(),
                                 None, msg.part))


def _stage(blocks: list[LocalBlock], tmp_path: Path, index: int, outbox: Any = None) -> Stage:
    engine = Engine(blocks, micro_batches=4)
    return Stage(index, engine, inbox=None, outbox=outbox, control=None,  # type: ignore[arg-type]
                 run_dir=tmp_path, epochs=1)


def test_a_stage_sends_each_micro_batch_on_as_soon_as_it_is_done(tmp_path: Path) -> None:
    """Stage 0 trains micro-batch i and sends it before it starts on i + 1; stage 1, fed
    those messages one by one, ends bitwise where the whole model's engine does."""
    cfg = _cfg("pred", 4)
    reference = _engine(cfg)
    blocks = _engine(cfg).blocks
    trace: list[Any] = []
    outbox = _Outbox(trace)
    head = _stage(blocks[:1], tmp_path, 0, outbox)
    tail = _stage(blocks[1:], tmp_path, 1)
    head.engine.blocks[0].body.register_forward_hook(
        lambda mod, inp, out: trace.append(("train", int(inp[0].shape[0]))))
    pipe = DistPipe(head, num_stages=2, wire_batch=10)
    for step, (x, y) in enumerate(_batches([10, 7])):
        reference.train_batch(x, y, 0)
        outbox.sent.clear()
        pipe.train_batch(step, 0, x, y)
        assert [(m.kind, m.step, m.part) for m in outbox.sent] == [
            (Kind.TRAIN, step, MicroBatch(i, 4, len(y))) for i in range(4)]
        for msg in outbox.sent:
            tail.handle(msg)
    assert trace[:8] == [("train", 3), ("send", 0, 3), ("train", 3), ("send", 1, 3),
                         ("train", 2), ("send", 2, 2), ("train", 2), ("send", 3, 2)]
    for a, b in zip(reference.blocks, blocks):
        assert_identical(a.checkpoint_state(), b.checkpoint_state(), b.spec.name)


# --------------------------------------------------------------------------- coupled samples


_COUPLED = [r for r in RULES.names() if RULES.get(r).couples_samples]


def test_the_rules_whose_loss_couples_samples() -> None:
    assert _COUPLED == ["glob+sim", "predsim", "predsim-bpf", "sim", "sim-bpf"]


@pytest.mark.parametrize("rule", _COUPLED)
def test_sample_coupling_rules_refuse_micro_batches(rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_micro_batches(_cfg(rule, 2))
    msg = str(err.value)
    assert "pipeline.micro_batches = 2" in msg and f"rule.name = {rule!r}" in msg
    assert "rule.micro_batch_similarity = true" in msg and "pipeline.micro_batches = 1" in msg
    check_micro_batches(_cfg(rule, 1))
    check_micro_batches(_cfg(rule, 2, "rule.micro_batch_similarity=true"))


def test_a_run_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rule\.micro_batch_similarity"):
        train(tiny_config(tmp_path, "pipeline.micro_batches=2", "pipeline.stages=1"))
    assert not any(tmp_path.iterdir())  # no run directory


@pytest.mark.parametrize("rule", ["sim", "predsim"])
def test_with_the_opt_in_similarity_is_taken_per_micro_batch(rule: str) -> None:
    cfg = _cfg(rule, 2, "rule.micro_batch_similarity=true")
    check_micro_batches(cfg)
    whole, micro = _engine(_cfg(rule, 1)), _engine(cfg)
    x, y = _batches([10])[0]
    whole.train_batch(x, y, 0)
    micro.train_batch(x, y, 0)
    w, m = whole.pop_train_stats()[0]["loss"], micro.pop_train_stats()[0]["loss"]
    assert torch.isfinite(torch.tensor(m)) and m != pytest.approx(w, rel=1e-3)  # another loss
