"""AugLocal's formulas against tables computed by hand, the shape of its auxiliary nets, and
its top layers that learn end to end (the authors' default) in the engine, partition and plan."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelocal.config import Config, ConfigError, ModelConfig, RuleConfig, load_config
from pipelocal.engine import Engine, LocalBlock, build_blocks
from pipelocal.launch.preflight import validate
from pipelocal.models import build_model
from pipelocal.pipeline.balance import balance_partition
from pipelocal.rules import RuleContext, build_rule, end_to_end_top
from pipelocal.rules.auglocal import AugLocalRule, aux_layers, pyramid_depth, select_layers
from pipelocal.runspec import RunSpec

# d_j for hidden layers j = 0..L-2, tau = 0.5, worked out by hand from
# d_j = round(d - (d - 1) j / (2 (L - 2))) (halves round to even: 2.5 -> 2, 1.5 -> 2).
# ResNet-32: L = 16, r_j = j / 28.
PYRAMID_RESNET32 = {
    2: [2] * 15,  # 2 - j/28 >= 1.5 (j = 14: 1.5 -> 2)
    3: [3] * 7 + [2] * 8,  # 3 - j/14: 2.5 at j = 7 -> 2
    4: [4] * 5 + [3] * 9 + [2],  # 4 - 3j/28: 3.5 at j = 4.67, 2.5 at j = 14 -> 2
    5: [5] * 4 + [4] * 7 + [3] * 4,  # 5 - j/7: 4.5 at j = 3.5, 3.5 at j = 10.5
}
# ResNet-110: L = 55, r_j = j / 106.
PYRAMID_RESNET110 = {
    2: [2] * 54,
    3: [3] * 27 + [2] * 27,  # 3 - j/53: 2.5 at j = 26.5
    4: [4] * 18 + [3] * 35 + [2],  # 4 - 3j/106: 3.5 at j = 17.67, 2.5 at j = 53 -> 2
    5: [5] * 14 + [4] * 26 + [3] * 14,  # 5 - 2j/53: 4.5 at j = 13.25, 3.5 at j = 39.75
}

# ResNet-32 with d = 2 (every d_j is 2): round(j + i (15 - j) / 2), i = 1, 2.
SELECT_RESNET32_D2 = [
    [8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15],
    [12, 15], [12, 15], [12, 15], [13, 15], [14, 15], [14, 15], [15],
]
# ResNet-32 with d = 4 and the pyramid above (depths 4 x5, 3 x9, 2).
SELECT_RESNET32_D4 = [
    [4, 8, 11, 15], [4, 8, 12, 15], [5, 8, 12, 15], [6, 9, 12, 15], [7, 10, 12, 15],
    [8, 12, 15], [9, 12, 15], [10, 12, 15], [10, 13, 15], [11, 13, 15], [12, 13, 15],
    [12, 14, 15], [13, 14, 15], [14, 15], [15],
]
# ResNet-110 (L = 55), constant d, rows j = 0, 1, 50, 53.
SELECT_RESNET110 = {
    (0, 2): [27, 54], (0, 3): [18, 36, 54], (0, 4): [14, 27, 40, 54],
    (0, 5): [11, 22, 32, 43, 54],
    (1, 2): [28, 54], (1, 3): [19, 36, 54], (1, 4): [14, 28, 41, 54],
    (1, 5): [12, 22, 33, 43, 54],
    (50, 2): [52, 54], (50, 3): [51, 53, 54], (50, 4): [51, 52, 53, 54],
    (50, 5): [51, 52, 53, 54],
    (53, 2): [54], (53, 3): [54], (53, 4): [54], (53, 5): [54],
}


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_pyramidal_depth_matches_hand_tables(d: int) -> None:
    """``rule.top_layers = "local"``: every hidden layer has an aux net, L_m = L."""
    assert [pyramid_depth(j, 16, d, 0.5) for j in range(15)] == PYRAMID_RESNET32[d]
    assert [pyramid_depth(j, 55, d, 0.5) for j in range(54)] == PYRAMID_RESNET110[d]


def test_no_decay_keeps_the_depth_and_depth_never_falls_below_one() -> None:
    assert {pyramid_depth(j, 16, 4, 0.0) for j in range(15)} == {4}
    assert pyramid_depth(14, 16, 1, 1.0) == 1


# The authors' default (``rule.top_layers = "backprop"``): ChenxiangMA/AugLocal ``train.py``
# line 84 (local_module_num -= aux_net_depth: L_m = L - d) and ``networks/resnet.py`` lines
# 135-138 (d_j over i < L_m - 1, denominator L_m - 2) and 145 (aux nets on net_config[:L_m - 1]).
# By hand, tau = 0.5, d_j = round(d - (d - 1) j / (2 (L_m - 2))), halves to even:
PYRAMID_AUTHORS = {
    # ResNet-32, d = 2: L_m = 14, 2 - j/24 >= 1.5 for j <= 12 (1.5 -> 2).
    (16, 2): [2] * 13,
    # ResNet-32, d = 4: L_m = 12, 4 - 3j/20: 3.55 at j = 3 -> 4, 3.4 at j = 4 -> 3,
    # 2.5 at j = 10 -> 2 (with L - 2 = 14 in the denominator j = 4 would get 4).
    (16, 4): [4] * 4 + [3] * 6 + [2],
    # ResNet-32, d = 5: L_m = 11, 5 - 2j/9: 4.56 at j = 2, 4.33 at j = 3, 3.44 at j = 7.
    (16, 5): [5] * 3 + [4] * 4 + [3] * 3,
    # ResNet-110, d = 5: L_m = 50, 5 - j/24: 4.5 at j = 12 -> 4, 3.5 at j = 36 -> 4.
    (55, 5): [5] * 12 + [4] * 25 + [3] * 12,
}
# ResNet-32, d = 4, the depths above, round(j + (15 - j) / d_j i): j = 0: 3.75 i -> 4, 8 (7.5),
# 11, 15; j = 4 (d_j = 3): 4 + 3.67 i -> 8, 11, 15; j = 7: 7 + 2.67 i -> 10, 12, 15;
# j = 10 (d_j = 2): 10 + 2.5 i -> 12 (12.5), 15.
SELECT_AUTHORS_RESNET32_D4 = {0: [4, 8, 11, 15], 4: [8, 11, 15], 7: [10, 12, 15],
                              10: [12, 15]}


@pytest.mark.parametrize(("num_layers", "d"), list(PYRAMID_AUTHORS))
def test_authors_pyramid_counts_only_the_layers_with_an_aux_net(num_layers: int, d: int) -> None:
    specs = build_model(ModelConfig(name="resnet32" if num_layers == 16 else "resnet110",
                                    width=0.25), (3, 32, 32), 10)
    cfg = RuleConfig(name="auglocal", aux_depth=d)
    assert AugLocalRule.end_to_end_layers(cfg) == d + 1
    hidden = num_layers - d - 1  # layers 0 .. L - d - 2 have an aux net
    assert [pyramid_depth(j, num_layers - d, d, 0.5) for j in range(hidden)] == \
        PYRAMID_AUTHORS[(num_layers, d)]
    if d == 4 and num_layers == 16:
        for j, want in SELECT_AUTHORS_RESNET32_D4.items():
            assert build_rule(specs[j].out_shape, 10, cfg, RuleContext(specs, j)).layers == want


def test_selection_matches_hand_tables() -> None:
    assert [aux_layers(j, 16, 2, 0.5) for j in range(15)] == SELECT_RESNET32_D2
    assert [aux_layers(j, 16, 4, 0.5) for j in range(15)] == SELECT_RESNET32_D4
    for (j, d), want in SELECT_RESNET110.items():
        assert select_layers(j, 55, d) == want, (j, d)


@pytest.mark.parametrize("d", [2, 3, 4, 5, 9])
def test_selection_is_increasing_ends_at_the_last_layer_and_respects_the_depth(d: int) -> None:
    for num_layers in (16, 55):
        for j in range(num_layers - 1):
            layers = aux_layers(j, num_layers, d, 0.5)
            assert layers[-1] == num_layers - 1
            assert layers == sorted(set(layers)) and layers[0] > j
            assert len(layers) == min(pyramid_depth(j, num_layers, d, 0.5), num_layers - 1 - j)


def _resnet32_rule(j: int, depth: int) -> nn.Module:
    specs = build_model(ModelConfig(name="resnet32"), (3, 32, 32), 10)
    cfg = RuleConfig(name="auglocal", aux_depth=depth, top_layers="local")
    return build_rule(specs[j].out_shape, 10, cfg, RuleContext(specs, j))


def test_aux_net_adapts_channels_and_downsamples_where_the_width_grows() -> None:
    rule = _resnet32_rule(0, 4)  # layers 4 (16 ch), 8 (32 ch), 11 (64 ch), 15 (64 ch)
    assert rule.layers == [4, 8, 11, 15]
    x = torch.zeros(2, 16, 32, 32)
    shapes = []
    for module in rule.aux:
        x = module(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[:4] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 8, 8)]
    assert shapes[-1] == (10,)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in rule.aux)
    assert isinstance(rule.aux[-3], nn.AdaptiveAvgPool2d)


def test_one_layer_aux_net_has_batchnorm1d_head() -> None:
    rule = _resnet32_rule(14, 4)  # only the last layer follows
    assert rule.layers == [15]
    kinds = [type(m).__name__ for m in rule.aux]
    assert kinds == ["BasicBlock", "AdaptiveAvgPool2d", "Flatten", "BatchNorm1d", "Linear"]
    h = torch.randn(4, 64, 8, 8)
    scores = rule.logits(h)
    assert scores.shape == (4, 10)
    loss, local = rule.loss(h, torch.arange(4))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert local.shape == (4, 10) and not local.requires_grad


def test_auglocal_needs_a_context_and_copyable_conv_blocks() -> None:
    with pytest.raises(ValueError, match="context=RuleContext"):
        build_rule((16, 8, 8), 10, RuleConfig(name="auglocal"))
    specs = build_model(ModelConfig(name="mlp", hidden=8, depth=2), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="convolutional auxiliary net"):
        build_rule(specs[0].out_shape, 10, RuleConfig(name="auglocal"), RuleContext(specs, 0))
    specs = build_model(ModelConfig(name="cnn", width=0.25, fc_width=8), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"BlockSpec\.template"):
        build_rule(specs[0].out_shape, 10, RuleConfig(name="auglocal"), RuleContext(specs, 0))


@pytest.mark.parametrize(
    ("key", "value"),
    [("aux_depth", 0), ("pyramid_tau", 1.5), ("aux_feature_dim", 0),
     ("infopro_recon", (1.0,)), ("infopro_ce", (0.5, -1.0))],
)
def test_new_rule_settings_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"rule.{key}"):
        RuleConfig(**{key: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- end-to-end top


def _cfg(*extra: str) -> Config:
    return load_config(None, ["model.name=resnet32", "model.width=0.25", "rule.name=auglocal",
                              "rule.aux_depth=4", "data.name=synthetic-cifar",
                              "optim.name=sgd", "optim.lr=0.1", *extra])


def _built(cfg: Config, indices: range | list[int] | None = None) -> list[LocalBlock]:
    specs = build_model(cfg.model, (3, 32, 32), 10)
    return build_blocks(cfg, specs, 10, indices if indices is not None else range(16), "cpu")


def test_top_blocks_have_no_aux_net_and_know_their_group() -> None:
    """ResNet-32, d = 4: aux nets on layers 0..10 (``net_config[:L_m - 1]``, L_m = 12); blocks
    11..15 (s3b1..out) learn from the output loss; top_layers = local: aux nets up to 14."""
    blocks = _built(_cfg())
    assert [b.rule is not None for b in blocks] == [True] * 11 + [False] * 5
    assert [b.top for b in blocks] == [None] * 11 + [range(11, 16)] * 5
    assert end_to_end_top(_cfg().rule, 16) == range(11, 16)
    local = _built(_cfg("rule.top_layers=local"))
    assert [b.rule is not None for b in local] == [True] * 15 + [False]
    assert all(b.top is None for b in local)
    with pytest.raises(ValueError, match="no auxiliary net"):
        specs = build_model(_cfg().model, (3, 32, 32), 10)
        build_rule(specs[11].out_shape, 10, _cfg().rule, RuleContext(specs, 11))
    with pytest.raises(ConfigError, match=r"rule\.aux_depth <= 14"):
        end_to_end_top(RuleConfig(name="auglocal", aux_depth=15), 16)


def test_top_learns_end_to_end_as_plain_backprop_of_its_blocks() -> None:
    """The top's step is one SGD step of cross-entropy through blocks 11..15, by hand."""
    cfg = _cfg()
    top = _built(cfg, range(11, 16))
    bodies = copy.deepcopy(nn.Sequential(*[b.body for b in top]))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *top[0].spec.in_shape, generator=gen), torch.tensor([0, 1, 2, 3])
    out = Engine(top).train_batch(x, y, epoch=0)
    F.cross_entropy(bodies(x), y).backward()
    with torch.no_grad():
        want = [p - 0.1 * p.grad for p in bodies.parameters()]
    got = [p for b in top for p in b.body.parameters()]
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert not torch.equal(got[0], next(iter(bodies.parameters())))  # block 11 moved
    stats = top[0].pop_stats()
    assert stats["loss"] == 0.0 and stats["acc"] is None  # its learning signal is the output's
    assert out.shape == (4, 10) and not out.requires_grad
    assert top[0].eval_step(x)[1] is None and top[-1].eval_step(x[:0].new_zeros(
        2, *top[-1].spec.in_shape))[1].shape == (2, 10)


def test_a_top_split_across_engines_fails_loudly() -> None:
    blocks = _built(_cfg(), range(12, 16))
    x, y = torch.randn(2, *blocks[0].spec.in_shape), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"blocks 11\.\.15 learn end to end"):
        Engine(blocks).train_batch(x, y, 0)
    with pytest.raises(RuntimeError, match="train them together"):
        blocks[0].train_step(x, y)


def _setup(cfg: Config) -> RunSpec:
    return RunSpec(cfg, (3, 32, 32), 10, Path())


@pytest.mark.parametrize(("extra", "match"), [
    (["pipeline.stages=2", "pipeline.partition=[13,3]"],
     r"pipeline\.partition = \[13, 3\] starts a stage at block s3b3, inside blocks s3b1\.\.out.*"
     r"rule\.top_layers = 'backprop'.*e\.g\. pipeline\.partition = \[8, 8\]"),
    (["pipeline.stages=13"], r"pipeline\.stages = 13 .* at most 12 stages"),
])
def test_a_partition_that_splits_the_top_is_a_config_error(extra: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(_setup(_cfg(*extra)))
    validate(_setup(_cfg("pipeline.stages=2", "pipeline.partition=[11,5]")))  # the top whole
    validate(_setup(_cfg("pipeline.stages=2", "pipeline.partition=[13,3]",
                         "rule.top_layers=local")))


def test_plan_keeps_the_top_in_one_stage() -> None:
    cfg = _cfg("pipeline.stages=12", "data.batch_size=4")
    plan = balance_partition(cfg, build_model(cfg.model, (3, 32, 32), 10), 10, torch.device("cpu"))
    assert plan.partition[-1] == 5 and plan.partition[:-1] == [1] * 11  # 12 stages: the top whole
    assert "blocks s3b1..out learn end to end" in plan.table()
    top = [p.time_s for p in plan.profiles[11:]]
    assert len(set(top)) == 1 and top[0] > 0  # one step, shared out
    two = balance_partition(cfg.replace(pipeline={"stages": 2}),
                            build_model(cfg.model, (3, 32, 32), 10), 10, torch.device("cpu"))
    assert sum(two.partition[:-1]) <= 11
