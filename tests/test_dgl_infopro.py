"""DGL's MLP-SR and InfoPro's decoder + classifier: head shapes, loss weights, the image path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelocal.config import Config, ModelConfig, RuleConfig
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model
from pipelocal.rules import RuleContext, build_rule
from pipelocal.rules.infopro import infopro_weights, unit_range, unnormalise
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


_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _infopro_rules(width: float = 1.0, **cfg: object) -> list[nn.Module]:
    specs = build_model(ModelConfig(name="resnet32", width=width), (3, 32, 32), 10)
    rule_cfg = RuleConfig(name="infopro", **cfg)  # type: ignore[arg-type]
    return [build_rule(s.out_shape, 10, rule_cfg, RuleContext(specs, j, _CIFAR_STATS))
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


def test_infopro_classifier_conv_has_stride_2_where_it_widens() -> None:
    """ChenxiangMA/AugLocal ``networks/auxiliary_nets.py`` lines 179-210 (``'InfoPro'``):
    Conv2d(16, 32, 3, stride=2), Conv2d(32, 64, 3, stride=2), Conv2d(64, 64, 3, stride=1).
    On ResNet-32's 32x32 / 16x16 / 8x8 maps the conv outputs 16x16 / 8x8 / 8x8."""
    rules = _infopro_rules()
    for j, size, stride, out in [(1, 32, 2, 16), (6, 16, 2, 8), (11, 8, 1, 8)]:
        conv = _types(rules[j].classifier, nn.Conv2d)[0]
        assert conv.stride == (stride, stride) and conv.padding == (1, 1), j
        c = conv.in_channels
        assert conv(torch.zeros(1, c, size, size)).shape[-2:] == (out, out)


def test_infopro_target_is_the_image_unnormalised_with_the_dataset_stats() -> None:
    """ChenxiangMA/AugLocal ``networks/resnet.py`` lines 173-191 (``_image_restore``):
    normalized * std + mean. By hand, CIFAR-10 (pipelocal's stats): a normalised 0 is the mean
    (0.4914, 0.4822, 0.4465), a normalised 1 is mean + std (0.7384, 0.7257, 0.7081)."""
    image = torch.zeros(2, 3, 4, 4)
    image[1] = 1.0
    rule = _infopro_rules(0.25)[3]
    target = rule.target(image)
    assert torch.allclose(target[0, :, 0, 0], torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(target[1, :, 0, 0], torch.tensor([0.7384, 0.7257, 0.7081]))
    assert torch.equal(target, unnormalise(image, _CIFAR_STATS))
    assert rule.target(torch.full((1, 3, 1, 1), 10.0)).unique().tolist() == [1.0]  # clamped
    minmax = _infopro_rules(0.25, infopro_target="minmax")[3]
    assert torch.equal(minmax.target(image), unit_range(image))  # constant channels -> 0


def test_infopro_needs_the_dataset_stats_unless_minmax() -> None:
    specs = build_model(ModelConfig(name="resnet32", width=0.25), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="infopro_target"):
        build_rule(specs[0].out_shape, 10, RuleConfig(name="infopro"), RuleContext(specs, 0))
    cfg = Config().replace(model={"name": "resnet32", "width": 0.25},
                           data={"name": "synthetic-cifar"}, rule={"name": "infopro"})
    block = build_blocks(cfg, specs, 10, [0], "cpu")[0]
    assert block.rule.image_stats == ((0.5,) * 3, (((256**2 - 1) / 12) ** 0.5 / 255,) * 3)


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
