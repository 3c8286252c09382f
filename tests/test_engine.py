"""Tests for pipelocal.engine: locality (no gradient between blocks), evaluation, global rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelocal.block import LocalBlock
from pipelocal.checkpoint import checkpoint_dir
from pipelocal.config import Config, load_config
from pipelocal.engine import Engine, LocalPipe, build_blocks
from pipelocal.models import BlockSpec, build_model

NUM_CLASSES = 10
SHAPE = (1, 8, 8)



def _cfg(rule: str = "predsim", *extra: str) -> Config:
    return load_config(
        None,
        [
            "model.name=cnn",
            "model.width=0.25",
            "model.fc_width=16",
            "model.dropout=0.1",
            f"rule.name={rule}",
            "rule.target_proj_size=16",
            "optim.lr=1e-2",
            *extra,
        ],
    )


def _specs(cfg: Config) -> list[BlockSpec]:
    return build_model(cfg.model, SHAPE, NUM_CLASSES)  # conv1, conv2, fc1, out


def _blocks(cfg: Config, indices: list[int] | None = None) -> list[LocalBlock]:
    specs = _specs(cfg)
    return build_blocks(cfg, specs, NUM_CLASSES, indices or range(len(specs)), "cpu")


def _batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(size, *SHAPE, generator=g),
            torch.randint(0, NUM_CLASSES, (size,), generator=g),
        )
        for _ in range(n)
    ]


def _assert_same_block(a: LocalBlock, b: LocalBlock) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for p in oa:
        for k in oa[p]:
            assert torch.equal(oa[p][k], ob[p][k]), (p, k)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


# --------------------------------------------------------------------------- locality


@pytest.mark.parametrize("rule", ["predsim", "pred-bpf", "sim"])
def test_block_0_is_the_same_with_or_without_later_blocks(rule: str) -> None:
    cfg = _cfg(rule)
    alone, full = Engine(_blocks(cfg, [0])), Engine(_blocks(cfg))
    assert full.indices == [0, 1, 2, 3] and alone.indices == [0]
    _assert_same_block(alone.blocks[0], full.blocks[0])  # same seed, same init
    for x, y in _batches(4):
        out_alone = alone.train_batch(x, y, epoch=0)
        full.train_batch(x, y, epoch=0)
        assert not out_alone.requires_grad
    _assert_same_block(alone.blocks[0], full.blocks[0])


@pytest.mark.parametrize(
    ("rule", "local"), [("predsim", True), ("pred-bpf", True), ("glob", False), ("glob+sim", False)]
)
def test_later_blocks_influence_block_0_only_under_a_global_rule(rule: str, local: bool) -> None:
    cfg = _cfg(rule)
    a, b = Engine(_blocks(cfg)), Engine(_blocks(cfg))
    with torch.no_grad():  # perturb every block after the first in b
        for block in b.blocks[1:]:
            for p in block.parameters():
                p.mul_(-2.0)
    for x, y in _batches(3):
        a.train_batch(x, y, epoch=0)
        b.train_batch(x, y, epoch=0)
    same = all(
        torch.equal(p, q) for p, q in zip(a.blocks[0].parameters(), b.blocks[0].parameters())
    )
    assert same == local


@pytest.mark.parametrize(("rule", "local"), [("predsim", True), ("glob", False)])
def test_what_a_block_receives_is_detached_only_under_a_local_rule(rule: str, local: bool) -> None:
    engine = Engine(_blocks(_cfg(rule)))
    seen: list[bool] = []
    for block in engine.blocks:
        block.body.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    x, y = _batches(1)[0]
    out = engine.train_batch(x, y, epoch=0)
    assert not out.requires_grad
    assert seen[0] is False and len(seen) == 4
    assert all(not s for s in seen) if local else all(seen[1:])


def test_global_rule_needs_every_block_in_one_engine() -> None:
    engine = Engine(_blocks(_cfg("glob"), [0, 1]))
    assert engine.is_global
    with pytest.raises(RuntimeError, match="every block"):
        engine.train_batch(*_batches(1)[0], epoch=0)
    assert not Engine(_blocks(_cfg("predsim"), [0])).is_global


def test_train_sets_the_epoch_learning_rate() -> None:
    engine = Engine(_blocks(_cfg("predsim", "run.epochs=4")))
    x, y = _batches(1)[0]
    engine.train_batch(x, y, epoch=2)  # step schedule: 0.25 from 50% of training
    assert {g["lr"] for b in engine.blocks for g in b.optimizer.param_groups} == {0.0025}


# --------------------------------------------------------------------------- evaluation


def _reference_predictions(engine: Engine, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each classifier's predicted class, by running the bodies and heads by hand."""
    preds, h = {}, x
    with torch.no_grad():
        for block in engine.blocks:
            block.eval()
            z = block.body(h)
            scores = z if block.is_output else block.rule.logits(z)
            if scores is not None:
                preds[block.index] = scores.argmax(1)
            h = torch.nn.functional.max_pool2d(z, block.spec.pool) if block.spec.pool > 1 else z
    return preds


def test_evaluate_counts_correct_predictions_of_output_and_local_classifiers() -> None:
    engine = Engine(_blocks(_cfg("predsim")))
    for x, y in _batches(3):
        engine.train_batch(x, y, epoch=0)
    x, _ = _batches(1, size=20)[0]
    preds = _reference_predictions(engine, x)
    assert sorted(preds) == [0, 1, 2, 3]
    out = preds[3]
    y = torch.where(torch.arange(20) < 7, out, (out + 1) % NUM_CLASSES)  # 7 right, 13 wrong
    engine.eval_batch(x[:12], y[:12])
    engine.eval_batch(x[12:], y[12:])
    stats = engine.pop_eval_stats()
    assert stats[3] == {"correct": 7, "count": 20}
    for i in (0, 1, 2):
        assert stats[i] == {"correct": int((preds[i] == y).sum()), "count": 20}
    assert engine.pop_eval_stats() == {}  # reset


def test_evaluate_skips_blocks_without_a_classifier() -> None:
    engine = Engine(_blocks(_cfg("sim")))
    x, y = _batches(1)[0]
    out = engine.eval_batch(x, y)
    assert out.shape == (16, NUM_CLASSES)
    stats = engine.pop_eval_stats()
    assert list(stats) == [3] and stats[3]["count"] == 16


def test_evaluate_does_not_train() -> None:
    engine = Engine(_blocks(_cfg("predsim")))
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in engine.blocks]
    engine.eval_batch(*_batches(1)[0])
    for block, state in zip(engine.blocks, before):
        assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


# --------------------------------------------------------------------------- global rules


@pytest.mark.parametrize("rule", ["glob", "glob+sim"])
def test_global_rules_train_end_to_end(rule: str) -> None:
    engine = Engine(_blocks(_cfg(rule, "model.dropout=0.0")))
    x, y = _batches(1, size=32)[0]
    losses, hidden = [], []
    for _ in range(20):
        engine.train_batch(x, y, epoch=0)
        stats = engine.pop_train_stats()
        losses.append(stats[3]["loss"])  # the output's cross-entropy
        hidden.append(stats[0]["loss"])  # glob: 0; glob+sim: block 0's sim loss
    assert losses[-1] < 0.5 * losses[0], losses
    if rule == "glob":
        assert set(hidden) == {0.0}
    else:
        assert 0 < hidden[-1] < 0.5 * hidden[0], hidden
    stats = engine.pop_train_stats()  # popped: back to zero
    assert stats[3]["loss"] == 0.0


def test_train_stats_per_block() -> None:
    engine = Engine(_blocks(_cfg("predsim")))
    engine.train_batch(*_batches(1)[0], epoch=0)
    stats = engine.pop_train_stats()
    assert sorted(stats) == [0, 1, 2, 3]
    assert all(s["loss"] > 0 and s["acc"] is not None for s in stats.values())


# --------------------------------------------------------------------------- save / pipe


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = _cfg("predsim")
    a = Engine(_blocks(cfg))
    batches = _batches(4)
    for x, y in batches[:2]:
        a.train_batch(x, y, epoch=0)
    ckpt = checkpoint_dir(tmp_path, 2)
    a.save(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [f"block_00{i}.pt" for i in range(4)]
    b = Engine(_blocks(cfg))
    b.load(ckpt)
    for x, y in batches[2:]:
        assert torch.equal(a.train_batch(x, y, epoch=0), b.train_batch(x, y, epoch=0))
    for p, q in zip(a.blocks, b.blocks):
        _assert_same_block(p, q)


def test_local_pipe_drives_its_engine(tmp_path: Path) -> None:
    pipe = LocalPipe(Engine(_blocks(_cfg("predsim"))))
    x, y = _batches(1)[0]
    pipe.train_batch(0, 0, x, y)
    pipe.eval_batch(x, y)
    [stage] = pipe.end_epoch(0)
    assert stage["stage"] == 0 and sorted(stage["blocks"]) == [0, 1, 2, 3]
    assert pipe.end_eval()[3]["count"] == 16
    pipe.checkpoint(tmp_path / "ck", 1)
    assert (tmp_path / "ck" / "block_003.pt").is_file()
    pipe.close()
