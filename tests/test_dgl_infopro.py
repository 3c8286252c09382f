"""DGL's MLP-SR and InfoPro's decoder + classifier: head shapes, loss weights, the image path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelocal.config import Config, ModelConfig, RuleConfig
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model
from pipelocal.rules import RuleContext, build_rule
from pipelocal.rules.infopro import infopro_weights, unit_range
from tests.conftest import assert_identical


def _types(module: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_dgl_mlp_sr_shapes() -> None:
    """Pool to H/4 x W/4, three 1x1 conv-BN-ReLU (width C), pool to 2x2, 3-layer MLP (4C)."""
    rule = build_rule((16, 32, 32), 10, RuleConfig(name="dgl"))
    convs = _types(rule.aux, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 16, (1, 1))] * 3
    assert [(f.in_features, f.out_features) for f in _types(rule.aux, nn.Linear)] == [
        (64, 64), (64, 64), (64, 10)]
    x = torch.randn(3, 16, 32, 32)
    assert rule.aux[0](x).shape == (3, 16, 8, 8)
    assert rule.logits(x).shape == (3, 10)


def test_dgl_on_fc_features_is_the_mlp() -> None:
    rule = build_rule((24,), 10, RuleConfig(name="dgl"))
    assert [(f.in_features, f.out_features) for f in _types(rule.aux, nn.Linear)] == [
        (24, 24), (24, 24), (24, 10)]


def _infopro_rules(width: float = 1.0) -> list[nn.Module]:
    specs = build_model(ModelConfig(name="resnet32", width=width), (3, 32, 32), 10)
    cfg = RuleConfig(name="infopro")
    return [build_rule(s.out_shape, 10, cfg, RuleContext(specs, j))
            for j, s in enumerate(specs[:-1])]


def test_infopro_heads_follow_the_paper_table() -> None:
    """ResNet-32: 32C3 / 64C3 / 64C3 - AP - 128FC - 10FC; decoder 12C3 - 3C3 at image size."""
    rules = _infopro_rules()
    for j, want in [(1, 32), (6, 64), (11, 64)]:  # one block of each stage
        conv = _types(rules[j].classifier, nn.Conv2d)[0]
        assert conv.out_channels == want
        linears = _types(rules[j].classifier, nn.Linear)
        assert [(f.in_features, f.out_features) for f in linears] == [(want, 128), (128, 10)]
        dec = _types(rules[j].decoder, nn.Conv2d)
        assert [(c.out_channels, c.kernel_size) for c in dec] == [(12, (3, 3)), (3, (3, 3))]
    h = torch.randn(2, 64, 8, 8)
    assert rules[11].reconstruct(h).shape == (2, 3, 32, 32)


def test_infopro_weights_interpolate_from_first_to_last_hidden_block() -> None:
    cfg = RuleConfig(name="infopro", infopro_recon=(5.0, 0.2), infopro_ce=(0.05, 0.5))
    assert infopro_weights(0, 16, cfg) == (5.0, 0.05)
    assert infopro_weights(14, 16, cfg) == pytest.approx((0.2, 0.5))
    assert infopro_weights(7, 16, cfg) == pytest.approx((2.6, 0.275))


def test_unit_range_maps_each_sample_and_channel_to_0_1() -> None:
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    u = unit_range(x)
    assert torch.allclose(u.flatten(2).min(2).values, torch.zeros(4, 3))
    assert torch.allclose(u.flatten(2).max(2).values, torch.ones(4, 3))


def test_infopro_loss_needs_the_image() -> None:
    rule = _infopro_rules(0.25)[3]
    with pytest.raises(ValueError, match="image"):
        rule.loss(torch.randn(2, 4, 32, 32), torch.tensor([0, 1]))


def test_engine_split_with_image_equals_whole_engine() -> None:
    """Blocks 0..3 then 4..9 in two engines, the image handed over, == one engine of all."""
    cfg = Config(model=ModelConfig(name="resnet20", width=0.25), rule=RuleConfig(name="infopro"))
    specs = build_model(cfg.model, (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    whole = Engine(build_blocks(cfg, specs, 10, range(10), "cpu"))
    first = Engine(build_blocks(cfg, specs, 10, range(4), "cpu"))
    second = Engine(build_blocks(cfg, specs, 10, range(4, 10), "cpu"))
    assert whole.needs_image and second.needs_image
    with pytest.raises(RuntimeError, match="input image"):
        Engine(build_blocks(cfg, specs, 10, range(4, 10), "cpu")).train_batch(
            torch.randn(6, *specs[4].in_shape), y, 0)
    for _ in range(2):
        whole.train_batch(x, y, 0)
        second.train_batch(first.train_batch(x, y, 0), y, 0, image=x)
    for a, b in zip(whole.blocks, [*first.blocks, *second.blocks]):
        assert_identical(a.state_dict(), b.state_dict(), a.spec.name)
