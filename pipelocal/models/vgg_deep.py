"""VGG19 (CIFAR) and VGG13 (ImageNet) with one locally trained block per conv layer.

    VGG19: 64-64-M-128-128-M-256x4-M-512x4-M-512x4-M, then a linear classifier (16 local layers)
    VGG13: 64-64-M-128-128-M-256-256-M-512-512-M-512-512-M, then fc-fc-fc (10 local layers)

as in Ma et al. (2024): each conv is conv3x3-BN-ReLU; the last conv layer is the output block
and also holds the max-pool and the classifier (VGG13: adaptive average pool to 7x7, then two
hidden fully connected layers of ``model.fc_width`` units and the output layer; VGG19:
global average pool and one linear layer, the usual CIFAR head). ``model.width`` scales the
conv channels. No dropout: a body draws nothing at random (determinism, see engine.py).
"""

from __future__ import annotations

import math

from torch import nn

from pipelocal.config import ConfigError, ModelConfig
from pipelocal.models.base import BlockSpec, LayerTemplate, register_model
from pipelocal.models.resample import AdaptiveAvgPool2d

__all__ = ["DEEP_VGG_LAYOUTS", "build_deep_vgg"]

DEEP_VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def _head(
    name: str, c: int, hw: tuple[int, int], num_classes: int, cfg: ModelConfig
) -> list[nn.Module]:
    """Max-pool, then torchvision's head on the pooled map of ``c`` x ``hw`` (before the pool)."""
    # ceil_mode: the final max-pool also works on a 1x1 map (small test inputs).
    pool = nn.MaxPool2d(2, ceil_mode=True)
    if name == "vgg19":
        return [pool, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    f = cfg.fc_width
    pooled = (math.ceil(hw[0] / 2), math.ceil(hw[1] / 2))
    return [
        # torchvision's AdaptiveAvgPool2d(7), from kernels that are deterministic on CUDA
        pool, AdaptiveAvgPool2d(pooled, 7), nn.Flatten(),
        nn.Linear(c * 49, f), nn.ReLU(), nn.Linear(f, f), nn.ReLU(), nn.Linear(f, num_classes),
    ]


def build_deep_vgg(
    name: str, cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int
) -> list[BlockSpec]:
    layout = DEEP_VGG_LAYOUTS[name]
    if len(in_shape) != 3:
        raise ConfigError(f"{name} needs image inputs [C, H, W]; got input shape {in_shape}")
    convs = [i for i, item in enumerate(layout) if item != "M"]
    specs: list[BlockSpec] = []
    c, h, w = in_shape
    for i in convs:
        c_out = max(1, round(int(layout[i]) * cfg.width))
        template = LayerTemplate(c_out, lambda c_in, st, c_out=c_out: _conv(c_in, c_out, st))
        if i == convs[-1]:
            specs.append(BlockSpec(
                name="out", kind="output",
                make=lambda c=c, c_out=c_out, hw=(h, w): nn.Sequential(
                    _conv(c, c_out), *_head(name, c_out, hw, num_classes, cfg)),
                in_shape=(c, h, w), out_shape=(num_classes,), template=template,
            ))
            break
        pool = 2 if layout[i + 1] == "M" else 1
        if pool > 1 and min(h, w) < 2:
            raise ConfigError(
                f"input {in_shape[1]}x{in_shape[2]} is too small for {name}: block "
                f"conv{len(specs) + 1} would max-pool a {h}x{w} map; use inputs of at least "
                "28x28"
            )
        specs.append(BlockSpec(
            name=f"conv{len(specs) + 1}", kind="conv",
            make=lambda c=c, c_out=c_out: _conv(c, c_out),
            in_shape=(c, h, w), out_shape=(c_out, h, w), pool=pool, template=template,
        ))
        c, h, w = specs[-1].wire_shape
    return specs


for _name in DEEP_VGG_LAYOUTS:
    register_model(_name)(
        lambda cfg, in_shape, num_classes, _name=_name: build_deep_vgg(
            _name, cfg, in_shape, num_classes
        )
    )
