"""Tests for pipelocal.models: every registered model builds, chains its shapes and trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelocal.config import Config, ModelConfig
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import MODELS, build_model

NUM_CLASSES = 10

# Model name -> (overrides, input shapes) small enough for CPU tests. A name missing here is
# tried with the VGG defaults, so a newly registered model is tested without an edit.
CASES: dict[str, tuple[dict, list[tuple[int, int, int]]]] = {
    "mlp": ({"hidden": 16, "depth": 2}, [(1, 8, 8)]),
    "cnn": ({"width": 0.25, "fc_width": 16}, [(1, 8, 8)]),
    "vgg8b": ({"width": 0.0625, "fc_width": 32}, [(1, 28, 28)]),
    "vgg11b": ({"width": 0.0625, "fc_width": 32}, [(1, 28, 28), (3, 96, 96)]),
    "mostafa-cnn5": ({"width": 0.0625, "dropout": 0.2, "input_dropout": 0.1}, [(3, 32, 32)]),
    "mostafa-cnn10": ({"width": 0.0625, "dropout": 0.2}, [(3, 32, 32)]),
}
_DEFAULT_CASE = ({"width": 0.0625, "fc_width": 32}, [(1, 28, 28)])



def _cases() -> list:
    return [
        pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
        for name in MODELS.names()
        for shape in CASES.get(name, _DEFAULT_CASE)[1]
    ]


def _model_cfg(name: str) -> ModelConfig:
    return ModelConfig(name=name, **CASES.get(name, _DEFAULT_CASE)[0])


@pytest.mark.parametrize(("name", "shape"), _cases())
def test_every_model_builds_with_consistent_shapes(name: str, shape: tuple[int, ...]) -> None:
    specs = build_model(_model_cfg(name), shape, NUM_CLASSES)
    assert specs[0].in_shape == shape
    assert [s.kind for s in specs][-1] == "output" and specs[-1].out_shape == (NUM_CLASSES,)
    assert all(s.kind != "output" for s in specs[:-1])
    assert len({s.name for s in specs}) == len(specs)  # names identify blocks in checkpoints
    x = torch.zeros(2, *shape)
    for prev, spec in zip([None, *specs], specs):
        if prev is not None:
            assert spec.in_shape == prev.wire_shape, spec.name
        body = spec.make().eval()
        h = body(x)
        assert tuple(h.shape[1:]) == spec.out_shape, spec.name
        pool = (spec.pool, spec.pool_stride or spec.pool, spec.pool_padding)
        x = nn.functional.max_pool2d(h, *pool) if spec.pool > 1 else h
        assert tuple(x.shape[1:]) == spec.wire_shape, spec.name


@pytest.mark.parametrize(("name", "shape"), _cases())
def test_every_model_trains_one_engine_step(name: str, shape: tuple[int, ...]) -> None:
    cfg = Config(model=_model_cfg(name))
    specs = build_model(cfg.model, shape, NUM_CLASSES)
    blocks = build_blocks(cfg, specs, NUM_CLASSES, range(len(specs)), "cpu")
    before = [{k: v.clone() for k, v in b.named_parameters()} for b in blocks]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *shape, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
    out = Engine(blocks).train_batch(x, y, epoch=0)
    assert out.shape == (4, NUM_CLASSES) and not out.requires_grad
    for block, params in zip(blocks, before):
        changed = [k for k, p in block.named_parameters() if not torch.equal(p, params[k])]
        assert changed, f"{name}: block {block.spec.name} was not updated"
        assert torch.isfinite(torch.tensor(block.pop_stats()["loss"]))


def test_mlp_layout() -> None:
    specs = build_model(ModelConfig(name="mlp", hidden=16, depth=3), (1, 8, 8), NUM_CLASSES)
    assert [s.name for s in specs] == ["fc1", "fc2", "fc3", "out"]
    assert [s.out_shape for s in specs] == [(16,), (16,), (16,), (NUM_CLASSES,)]
    assert specs[0].in_shape == (1, 8, 8) and specs[1].in_shape == (16,)
    first = specs[0].make()
    linear = next(m for m in first.modules() if isinstance(m, nn.Linear))
    assert linear.in_features == 64 and linear.bias is None  # BN follows, so no bias
    assert any(isinstance(m, nn.BatchNorm1d) for m in first.modules())


def test_mlp_without_batchnorm_and_with_leaky_relu() -> None:
    cfg = ModelConfig(name="mlp", hidden=8, depth=1, batchnorm=False, nonlin="leaky_relu")
    body = build_model(cfg, (4,), 3)[0].make()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in body.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in body.modules())
    assert next(m for m in body.modules() if isinstance(m, nn.Linear)).bias is not None


def test_vgg8b_layout_matches_the_paper() -> None:
    specs = build_model(ModelConfig(name="vgg8b"), (3, 32, 32), NUM_CLASSES)
    # conv128-conv256-pool-conv256-conv512-pool-conv512-pool-conv512-pool-fc1024-fc
    assert [s.out_shape[0] for s in specs] == [128, 256, 256, 512, 512, 512, 1024, NUM_CLASSES]
    assert [s.pool for s in specs] == [1, 2, 1, 2, 2, 2, 1, 1]
    assert specs[-2].in_shape == (512, 2, 2)


def test_vgg11b_has_eleven_blocks_and_width_scales_channels() -> None:
    specs = build_model(ModelConfig(name="vgg11b", width=2.0), (3, 32, 32), NUM_CLASSES)
    assert len(specs) == 11
    assert specs[0].out_shape == (256, 32, 32)
    conv = next(m for m in specs[0].make().modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)


def test_vgg_on_96x96_starts_with_a_7x7_stride_2_conv() -> None:
    specs = build_model(_model_cfg("vgg11b"), (3, 96, 96), NUM_CLASSES)
    conv = next(m for m in specs[0].make().modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert specs[0].out_shape[1:] == (48, 48)
    later = next(m for m in specs[1].make().modules() if isinstance(m, nn.Conv2d))
    assert later.kernel_size == (3, 3) and later.stride == (1, 1)


def test_input_shape_in_config_wins() -> None:
    cfg = ModelConfig(name="mlp", hidden=4, depth=1, input_shape=(1, 2, 2))
    assert build_model(cfg, (1, 8, 8), 3)[0].in_shape == (1, 2, 2)


def test_vgg_rejects_inputs_that_are_too_small_or_flat() -> None:
    with pytest.raises(ValueError, match="too small") as err:
        build_model(ModelConfig(name="vgg8b"), (1, 8, 8), NUM_CLASSES)
    assert "8x8" in str(err.value) and "mlp" in str(err.value)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        build_model(ModelConfig(name="cnn"), (64,), NUM_CLASSES)


def test_unknown_model_lists_the_available_ones() -> None:
    with pytest.raises(KeyError) as err:
        MODELS.get("resnet")
    msg = str(err.value)
    assert "'resnet'" in msg and "available" in msg
    assert all(name in msg for name in MODELS.names())
    assert {"mlp", "cnn", "vgg8b", "vgg11b"} <= set(MODELS.names())


def test_vgg_uses_the_7x7_first_layer_above_64_pixels_as_the_authors() -> None:
    """The authors' test is ``input_dim > 64``: 72x72 inputs get it, 64x64 ones do not."""
    for side, kernel in ((72, 7), (64, 3)):
        specs = build_model(_model_cfg("vgg8b"), (3, side, side), NUM_CLASSES)
        conv = next(m for m in specs[0].make().modules() if isinstance(m, nn.Conv2d))
        assert conv.kernel_size == (kernel, kernel), side


def test_mostafa_nets_match_the_papers_sizes() -> None:
    """The paper's Fig. 6 counts: parameters (without the output layer) and activations."""
    import math

    for name, params, acts in (("mostafa-cnn5", 13_716_512, 40_960),
                               ("mostafa-cnn10", 9_402_048, 156_160)):
        specs = build_model(ModelConfig(name=name), (3, 32, 32), NUM_CLASSES)
        weights = sum(p.numel() for s in specs[:-1] for p in s.make().parameters() if p.dim() > 1)
        assert weights == params, name
        assert sum(math.prod(s.wire_shape) for s in specs[:-1]) == acts, name
    cnn5 = build_model(ModelConfig(name="mostafa-cnn5", dropout=0.5, input_dropout=0.2),
                       (3, 32, 32), NUM_CLASSES)
    assert [s.pool for s in cnn5[:3]] == [3, 3, 3] and cnn5[0].pool_stride == 2
    assert all(s.dropout_after_pool and s.dropout == 0.5 for s in cnn5[:3])
    assert cnn5[0].input_dropout == 0.2 and cnn5[1].input_dropout == 0.0
    assert [s.out_shape for s in cnn5[3:5]] == [(2048,), (2048,)]


def test_mostafa_cnn10_rejects_inputs_too_small_for_five_pools() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_model(ModelConfig(name="mostafa-cnn10"), (1, 28, 28), NUM_CLASSES)
