"""Weight initialisation (``model.init``): the AugLocal authors' he-normal convs, PyTorch's
defaults, and which one ``auto`` picks for each rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelocal.config import ConfigError, ModelConfig, load_config
from pipelocal.engine import LocalBlock, build_blocks
from pipelocal.models import build_model

_RESNET = ["model.name=resnet32", "data.name=synthetic-cifar"]


def _blocks(rule: str, *extra: str) -> list[LocalBlock]:
    cfg = load_config(None, [*_RESNET, f"rule.name={rule}", *extra])
    specs = build_model(cfg.model, (3, 32, 32), 10)
    return build_blocks(cfg, specs, 10, [0, 1, len(specs) - 1], "cpu")


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("rule", ["auglocal", "dgl", "infopro"])
def test_auto_is_he_normal_for_the_auglocal_authors_rules(rule: str) -> None:
    """ChenxiangMA/AugLocal ``networks/resnet.py`` lines 166-172: every Conv2d of the model,
    the auxiliary nets included, gets normal(0, sqrt(2 / n)) with n = k_h k_w C_out. By hand:
    a 3x3 conv with 16 outputs: std = sqrt(2 / 144) = 0.11785; a 1x1 conv with 16 outputs
    (DGL's MLP-SR): sqrt(2 / 16) = 0.35355; InfoPro's 3x3 decoder conv with 12 outputs:
    sqrt(2 / 108) = 0.13608. The output fc keeps PyTorch's default, uniform(+-1/sqrt(64))."""
    stem, block1, out = _blocks(rule)
    want = {(3, 16): 0.11785, (1, 16): 0.35355, (3, 12): 0.13608, (3, 32): 0.08333}
    seen = set()
    for conv in _convs(block1) + _convs(stem):
        key = (conv.kernel_size[0], conv.out_channels)
        if key in want and conv.weight.numel() >= 256:  # enough draws for a 10 % tolerance
            assert conv.weight.std().item() == pytest.approx(want[key], rel=0.1), key
            assert conv.weight.mean().abs().item() < 0.2 * want[key]
            seen.add(key)
    assert (3, 16) in seen and len(seen) >= 2, seen  # the body's convs and the rule's heads
    fc = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    bound = 1 / math.sqrt(fc.in_features)
    assert 0 < fc.weight.abs().max().item() <= bound
    assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_pytorch_init_keeps_the_default_convs_and_zeroes_the_output_layer() -> None:
    """PyTorch's conv default: kaiming_uniform(a = sqrt 5), std = 1 / sqrt(3 fan_in); a 3x3
    conv from 16 channels: 1 / sqrt(3 * 144) = 0.04811 (far from he-normal's 0.11785)."""
    for rule, extra in (("predsim", ()), ("auglocal", ("model.init=pytorch",))):
        _, block1, out = _blocks(rule, *extra)
        conv = block1.body.residual[0]
        assert conv.weight.std().item() == pytest.approx(0.04811, rel=0.1), rule
        fc = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
        assert torch.count_nonzero(fc.weight) == 0, rule


def test_he_normal_can_be_chosen_for_any_rule_and_is_seeded_per_block() -> None:
    a = _blocks("predsim", "model.init=he-normal")
    b = _blocks("predsim", "model.init=he-normal")
    assert a[1].body.residual[0].weight.std().item() == pytest.approx(0.11785, rel=0.1)
    assert torch.equal(a[1].body.residual[0].weight, b[1].body.residual[0].weight)
    fc = [m for m in a[2].modules() if isinstance(m, nn.Linear)][-1]
    assert torch.count_nonzero(fc.weight) > 0  # he-normal leaves the output fc at the default


def test_unknown_init_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.init.*auto, pytorch, he-normal"):
        ModelConfig(init="xavier")  # type: ignore[arg-type]
