"""AugLocal's formulas against tables computed by hand, and the shape of its auxiliary nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelocal.config import ConfigError, ModelConfig, RuleConfig
from pipelocal.models import build_model
from pipelocal.rules import RuleContext, build_rule
from pipelocal.rules.auglocal import aux_layers, pyramid_depth, select_layers

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
    assert [pyramid_depth(j, 16, d, 0.5) for j in range(15)] == PYRAMID_RESNET32[d]
    assert [pyramid_depth(j, 55, d, 0.5) for j in range(54)] == PYRAMID_RESNET110[d]


def test_no_decay_keeps_the_depth_and_depth_never_falls_below_one() -> None:
    assert {pyramid_depth(j, 16, 4, 0.0) for j in range(15)} == {4}
    assert pyramid_depth(14, 16, 1, 1.0) == 1


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
    cfg = RuleConfig(name="auglocal", aux_depth=depth)
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
