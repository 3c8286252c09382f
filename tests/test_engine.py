"""Tests for pipelocal.engine: blocks (seeding, dropout generator, schedule, statistics,
checkpoints) and the engine (locality: no gradient between blocks, evaluation, global rules).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from pipelocal.checkpoint import checkpoint_dir
from pipelocal.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RuleConfig,
    ScheduleConfig,
    load_config,
)
from pipelocal.engine import (
    Engine,
    LocalBlock,
    block_seed,
    build_blocks,
)
from pipelocal.models import BlockSpec, build_model
from tests.conftest import assert_identical

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


# --------------------------------------------------------------------------- save


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


def _mlp_specs(dropout: float = 0.0) -> list[BlockSpec]:
    cfg = ModelConfig(name="mlp", hidden=16, depth=2, dropout=dropout)
    return build_model(cfg, (1, 8, 8), NUM_CLASSES)  # fc1, fc2, out


def _block(
    index: int = 0,
    spec: BlockSpec | None = None,
    *,
    seed: int = 0,
    rule: str = "predsim",
    schedule: ScheduleConfig | None = None,
    epochs: int = 4,
    dropout: float = 0.0,
) -> LocalBlock:
    return LocalBlock(
        index,
        spec or _mlp_specs(dropout)[index],
        num_classes=NUM_CLASSES,
        rule=RuleConfig(name=rule, target_proj_size=16),
        optim=OptimConfig(lr=1e-2),
        schedule=schedule or ScheduleConfig(),
        epochs=epochs,
        seed=seed,
    )


def _batch(shape: tuple[int, ...] = (1, 8, 8), seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _state(block: LocalBlock) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _linear_weight(block: LocalBlock) -> torch.Tensor:
    return next(m for m in block.body.modules() if isinstance(m, torch.nn.Linear)).weight


def _assert_same_state(a: LocalBlock, b: LocalBlock) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # tensors, and the extra state (the seed of fixed random matrices)
        assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k


# --------------------------------------------------------------------------- seeding


def test_block_seed_is_deterministic_and_distinct() -> None:
    assert block_seed(0, 3) == block_seed(0, 3)
    seeds = {block_seed(s, i) for s in range(4) for i in range(8)}
    assert len(seeds) == 32
    assert all(0 <= s < 2**63 for s in seeds)


def test_same_seed_and_index_give_identical_init_whatever_the_global_rng() -> None:
    torch.manual_seed(1)
    a = _block(1, rule="predsim-bpf")
    torch.manual_seed(2)
    torch.rand(100)
    b = _block(1, rule="predsim-bpf")
    _assert_same_state(a, b)  # body, heads and the fixed random matrices
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_different_index_or_seed_gives_different_init() -> None:
    spec = _mlp_specs()[1]  # fc2, [16] -> [16]: the same layers at any index
    a, b, c = _block(1, spec), _block(2, spec), _block(1, spec, seed=1)
    for other in (b, c):
        assert not torch.equal(_linear_weight(a), _linear_weight(other))
        assert not torch.equal(a.rule.decoder.bias, other.rule.decoder.bias)  # weight: zero


def test_building_a_block_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _block(0)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- dropout


def test_dropout_masks_come_from_the_block_generator() -> None:
    x, y = _batch()
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        block = _block(0, dropout=0.5)
        outs.append((block.train_step(x, y), block.train_step(x, y)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # The generator advances: a second step draws a new mask.
    assert not torch.equal(outs[0][0] == 0, outs[0][1] == 0)


def test_dropout_zeroes_and_rescales_what_is_passed_on() -> None:
    x, y = _batch()
    dropped = _block(0, dropout=0.5).train_step(x, y)
    plain = _block(0, dropout=0.0).train_step(x, y)  # same body, same step
    kept = dropped != 0
    assert torch.equal(dropped[kept], 2.0 * plain[kept])  # x 1 / (1 - p)
    assert ((plain != 0) & ~kept).any()  # some live units were dropped
    assert ((plain != 0) & kept).any()


def test_no_dropout_in_eval() -> None:
    block = _block(0, dropout=0.5)
    x, _ = _batch()
    out, scores = block.eval_step(x)
    block.eval()
    with torch.no_grad():
        assert torch.equal(out, block.body(x))
    assert scores.shape == (16, NUM_CLASSES)


# --------------------------------------------------------------------------- schedule


def test_lr_warmup_sets_every_param_group_once_per_epoch() -> None:
    schedule = ScheduleConfig(name="cosine", warmup_epochs=10)
    cfg = _cfg("predsim", "optim.name=sgd", "optim.lr=0.8", "run.epochs=400",
               "schedule.name=cosine", "schedule.warmup_epochs=10")
    block = _blocks(cfg, [0])[0]
    assert block.schedule == schedule
    block.set_epoch(1)  # the authors' e = 2
    assert [g["lr"] for g in block.optimizer.param_groups] == [pytest.approx(0.08899507)]


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"warmup_epochs": -1}, "schedule.warmup_epochs"),
    ({"name": "step", "warmup_epochs": 10}, "schedule.warmup_epochs"),
    ({"name": "cosine", "warmup_start_lr": -0.1}, "schedule.warmup_start_lr"),
])
def test_warmup_settings_are_validated(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ScheduleConfig(**kwargs)


def test_set_epoch_sets_the_optimizer_lr() -> None:
    block = _block(0, schedule=ScheduleConfig(name="step", milestones=(0.5,), gamma=0.1), epochs=10)
    lrs = []
    for epoch in (0, 4, 5, 9, 0):
        block.set_epoch(epoch)
        lrs.append([g["lr"] for g in block.optimizer.param_groups])
    assert lrs == [[1e-2], [1e-2], [pytest.approx(1e-3)], [pytest.approx(1e-3)], [1e-2]]
    assert block.epoch == 0


# --------------------------------------------------------------------------- train / stats


def test_train_step_updates_and_returns_a_detached_output() -> None:
    block = _block(0)
    before = _state(block)
    x, y = _batch()
    out = block.train_step(x, y)
    assert out.shape == (16, 16) and not out.requires_grad
    assert not torch.equal(block.state_dict()["body.1.weight"], before["body.1.weight"])
    assert block.training


def test_conv_block_pools_what_it_passes_on() -> None:
    spec = build_model(ModelConfig(name="cnn", width=0.25, fc_width=16), (1, 8, 8), NUM_CLASSES)[0]
    block = _block(0, spec)
    x, y = _batch()
    out = block.train_step(x, y)
    assert tuple(out.shape[1:]) == spec.wire_shape == (8, 4, 4)


def test_pop_stats_means_and_resets() -> None:
    block = _block(2)  # output block: cross-entropy and accuracy
    x, y = _batch((16,))
    losses = []
    for n in (16, 4):
        with torch.no_grad():
            block.eval()
            losses.append(float(torch.nn.functional.cross_entropy(block.body(x[:n]), y[:n])))
        block.train_step(x[:n], y[:n])
    stats = block.pop_stats()
    # The output block is a plain Linear, so eval and train forward agree exactly; with
    # predsim its cross-entropy is scaled by 1 - beta (the authors' output loss).
    expected = (1 - 0.99) * (16 * losses[0] + 4 * losses[1]) / 20
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= stats["acc"] <= 1.0
    assert block.pop_stats() == {"loss": 0.0, "acc": None, "nonfinite_at": None, "rows": 0,
                                 "scored": 0}


def test_stats_without_a_classifier_have_no_accuracy() -> None:
    block = _block(0, rule="sim")
    block.train_step(*_batch())
    stats = block.pop_stats()
    assert stats["acc"] is None and math.isfinite(stats["loss"]) and stats["loss"] > 0


def test_pop_stats_loss_is_the_sample_weighted_mean() -> None:
    block = _block(0)
    y = torch.zeros(3, dtype=torch.int64)
    block.record(torch.tensor(2.0), None, y)
    block.record(torch.tensor(5.0), None, y[:1])
    assert block.pop_stats() == {"loss": pytest.approx((3 * 2.0 + 5.0) / 4), "acc": None,
                                 "nonfinite_at": None, "rows": 4, "scored": 0}


# --------------------------------------------------------------------------- checkpoints


def _through_disk(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("rule", ["predsim-bpf", "scfb"])
def test_checkpoint_round_trip_continues_identically(rule: str) -> None:
    a = _block(0, dropout=0.3, rule=rule)
    for s in range(3):
        a.set_epoch(s)
        a.train_step(*_batch(seed=s))
    b = _block(0, dropout=0.3, rule=rule, seed=7)  # scfb: other M, K until the seed is loaded
    b.load_checkpoint_state(_through_disk(a.checkpoint_state()))
    assert b.epoch == a.epoch == 2
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    fresh = _block(0, dropout=0.3, rule=rule)
    for s in range(3, 6):
        outs = [blk.train_step(*_batch(seed=s)) for blk in (a, b, fresh)]
        assert torch.equal(outs[0], outs[1])
    _assert_same_state(a, b)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert not torch.equal(_linear_weight(a), _linear_weight(fresh))
    for name, buf in a.rule.named_buffers():  # fixed matrices: regenerated, not stored
        assert torch.equal(buf, dict(b.rule.named_buffers())[name]), name


def test_checkpoint_state_contents() -> None:
    block = _block(1)
    state = block.checkpoint_state()
    assert state["index"] == 1 and state["name"] == "fc2" and state["epoch"] == -1
    assert set(state) == {"index", "name", "module", "optimizer", "generator", "epoch"}


def test_loading_into_another_block_fails_clearly() -> None:
    spec = _mlp_specs()[1]
    state = _block(1, spec).checkpoint_state()
    with pytest.raises(ValueError) as err:
        _block(2, spec).load_checkpoint_state(state)
    msg = str(err.value)
    assert "block 1 (fc2)" in msg and "block 2 (fc2)" in msg and "config differs" in msg
    with pytest.raises(ValueError, match=r"block 0 \(fc1\)"):
        _block(1).load_checkpoint_state(_block(0).checkpoint_state())


def test_checkpoint_moves_between_device_types() -> None:
    """A CUDA generator state (16 bytes: seed, offset) loads on CPU with a clear warning;
    parameters and optimiser state load exactly."""
    a, b = _block(), _block()
    x, y = _batch()
    a.train_step(x, y)
    state = a.checkpoint_state()
    assert state["generator"]["device"] == "cpu"
    state["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    with pytest.warns(UserWarning, match="a cuda state and this block runs on cpu"):
        b.load_checkpoint_state(state)
    assert_identical(b.state_dict(), a.state_dict())
    assert_identical(b.optimizer.state_dict()["state"], a.optimizer.state_dict()["state"])
    # The new stream is a pure function of the checkpoint: loading it again gives the same one.
    c = _block()
    with pytest.warns(UserWarning):
        c.load_checkpoint_state(state)
    assert torch.equal(b.generator.get_state(), c.generator.get_state())
    assert not torch.equal(b.generator.get_state(), a.generator.get_state())


def test_checkpoint_from_before_device_types_were_stored_loads() -> None:
    a, b = _block(), _block()
    a.train_step(*_batch())
    state = a.checkpoint_state()
    state["generator"] = state["generator"]["state"]  # the old format: the bare CPU state
    b.load_checkpoint_state(state)
    assert torch.equal(b.generator.get_state(), a.generator.get_state())


def test_building_a_block_does_not_reseed_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.manual_seed would reseed every GPU's global generator, which other code draws from."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    _block(dropout=0.1)
    assert calls == []


def test_bf16_precision_autocasts_and_keeps_fp32_weights() -> None:
    spec = _mlp_specs()[0]
    block = LocalBlock(0, spec, num_classes=NUM_CLASSES, rule=RuleConfig(name="predsim"),
                       optim=OptimConfig(lr=1e-2), schedule=ScheduleConfig(), epochs=4, seed=0,
                       precision="bf16")
    out = block.train_step(*_batch())
    assert out.dtype == torch.bfloat16  # what the next block (or the wire) receives
    assert all(p.dtype == torch.float32 for p in block.parameters())
    state = block.optimizer.state_dict()["state"]
    assert all(v.dtype == torch.float32 for s in state.values() for k, v in s.items()
               if k != "step")


# --------------------------------------------------------------------------- the authors' choices


def _conv_block(dropout: float, conv_dropout: str = "channel", rule: str = "predsim") -> LocalBlock:
    cfg = ModelConfig(name="cnn", width=0.25, fc_width=16, dropout=dropout,
                      conv_dropout=conv_dropout)
    spec = build_model(cfg, (1, 8, 8), NUM_CLASSES)[0]  # conv 1 -> 8 maps, 8x8, then pool 2
    return LocalBlock(0, spec, num_classes=NUM_CLASSES, rule=RuleConfig(name=rule),
                      optim=OptimConfig(lr=1e-2), schedule=ScheduleConfig(), epochs=2, seed=0)


def test_conv_dropout_drops_whole_feature_maps_from_the_block_generator() -> None:
    """The authors' conv blocks use nn.Dropout2d: a dropped map is zero at every position."""
    block = _conv_block(0.5)
    block.train(True)
    h = torch.rand(6, 8, 4, 4) + 0.5  # strictly positive: a zero can only come from the mask
    out = block.pass_on(h)  # dropout, then the 2x2 max-pool
    zero_maps = (out == 0).all(dim=(2, 3))  # [B, C]
    assert torch.equal(zero_maps, (out == 0).any(dim=(2, 3)))  # all or nothing per map
    assert zero_maps.any() and not zero_maps.all()
    kept = ~zero_maps
    plain = torch.nn.functional.max_pool2d(h, 2)
    assert torch.equal(out[kept], 2.0 * plain[kept])  # x 1 / (1 - p)
    # The mask is one draw per (sample, map) from the block's own generator.
    gen = torch.Generator().manual_seed(block_seed(0, 0) + 1)
    keep = torch.empty(6, 8, 1, 1).bernoulli_(0.5, generator=gen)
    assert torch.equal(kept, keep[:, :, 0, 0].bool())


def test_element_conv_dropout_remains_an_option() -> None:
    block = _conv_block(0.5, conv_dropout="element")
    block.train(True)
    out = block._dropout(torch.rand(6, 8, 4, 4) + 0.5, 0.5, block.spec.channel_dropout)
    zeros = out == 0
    assert not torch.equal(zeros.all(dim=(2, 3)), zeros.any(dim=(2, 3)))  # partial maps


@pytest.mark.parametrize("rule", ["predsim", "pred", "sym"])
def test_output_layer_weight_starts_at_zero_under_a_local_rule(rule: str) -> None:
    out = _block(2, rule=rule)
    assert torch.count_nonzero(out.body.weight) == 0
    assert torch.count_nonzero(out.body.bias) > 0  # the authors zero only the weight


@pytest.mark.parametrize("rule", ["glob", "fa"])
def test_output_layer_keeps_the_default_init_under_backprop(rule: str) -> None:
    assert torch.count_nonzero(_block(2, rule=rule).body.weight) > 0  # fa: a LinearFA


@pytest.mark.parametrize(
    ("rule", "scale"), [("predsim", 0.01), ("predsim-bpf", 0.01), ("pred", 1.0), ("sim", 1.0),
                        ("glob+sim", 1.0), ("sym", 1.0)]
)
def test_output_cross_entropy_is_scaled_by_one_minus_beta_with_predsim(
    rule: str, scale: float
) -> None:
    block = _block(2, rule=rule)
    x, y = _batch((16,))
    loss, _ = block.local_loss(block(x), y)
    torch.testing.assert_close(loss, scale * torch.nn.functional.cross_entropy(block(x), y))
    cfg = RuleConfig(name="predsim", scale_output_loss=False)
    unscaled = LocalBlock(2, _mlp_specs()[2], num_classes=NUM_CLASSES, rule=cfg,
                          optim=OptimConfig(), schedule=ScheduleConfig(), epochs=1, seed=0)
    assert unscaled.output_scale == 1.0


def test_milestone_epochs_are_validated() -> None:
    from pipelocal.config import ConfigError

    with pytest.raises(ConfigError, match=r"schedule\.milestone_epochs"):
        ScheduleConfig(milestone_epochs=(300, 200))
    with pytest.raises(ConfigError, match=r"increasing epochs >= 1"):
        ScheduleConfig(milestone_epochs=(0,))


def test_sgd_defaults_are_the_authors_plain_sgd() -> None:
    cfg = OptimConfig(name="sgd", lr=0.1)
    assert cfg.momentum == 0.0 and not cfg.nesterov
    from pipelocal.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.nesterov"):
        OptimConfig(name="sgd", nesterov=True)
    block = LocalBlock(0, _mlp_specs()[0], num_classes=NUM_CLASSES, rule=RuleConfig(),
                       optim=OptimConfig(name="sgd", momentum=0.9, nesterov=True),
                       schedule=ScheduleConfig(), epochs=1, seed=0)
    group = block.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"]
