"""VGG8B and VGG11B of Nøkland & Eidnes (2019), one locally trained block per layer.

    VGG8B:  conv128-conv256-pool-conv256-conv512-pool-conv512-pool-conv512-pool-fc1024-fc
    VGG11B: conv128-conv128-conv128-conv256-pool-conv256-conv512-pool-conv512-conv512-pool-
            conv512-pool-fc1024-fc

Each conv block is conv3x3-BN-nonlin(-dropout); a max-pool 2x2 following a conv is applied by
that block to what it passes on. ``model.width`` scales every conv's channels (2.0 = the
paper's (2x) variant). Inputs larger than 64x64 (STL-10) start with a 7x7 stride-2 conv, as
the authors' code (``input_dim > 64``). Conv blocks drop whole feature maps unless
``model.conv_dropout = "element"``.
"""

from __future__ import annotations

from torch import nn

from pipelocal.config import ConfigError, ModelConfig
from pipelocal.models.base import BlockSpec, flat_size, nonlinearity, register_model

__all__ = ["VGG_LAYOUTS", "build_vgg", "conv_block", "fc_block"]

VGG_LAYOUTS: dict[str, list[int | str]] = {
    # A small conv net in the same style for 8x8+ inputs (the embedded digits set, tests).
    "cnn": [32, "M", 64, "M"],
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
}


def conv_block(
    c_in: int, c_out: int, kernel: int, stride: int, cfg: ModelConfig
) -> nn.Sequential:
    """conv(kernel, stride, same padding)-BN-nonlin (no conv bias under BN)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=not cfg.batchnorm)
    ]
    if cfg.batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nonlinearity(cfg.nonlin))
    return nn.Sequential(*layers)


def fc_block(d_in: int, d_out: int, cfg: ModelConfig) -> nn.Sequential:
    """flatten-linear-BN-nonlin (no linear bias under BN)."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d_in, d_out, bias=not cfg.batchnorm)]
    if cfg.batchnorm:
        layers.append(nn.BatchNorm1d(d_out))
    layers.append(nonlinearity(cfg.nonlin))
    return nn.Sequential(*layers)


def build_vgg(
    layout: list[int | str], cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int
) -> list[BlockSpec]:
    if len(in_shape) != 3:
        raise ConfigError(f"VGG models need image inputs [C, H, W]; got input shape {in_shape}")
    specs: list[BlockSpec] = []
    c, h, w = in_shape
    first = True
    for i, item in enumerate(layout):
        if item == "M":
            continue
        c_out = max(1, round(int(item) * cfg.width))
        kernel, stride = (7, 2) if first and min(h, w) > 64 else (3, 1)
        first = False
        pool = 2 if i + 1 < len(layout) and layout[i + 1] == "M" else 1
        h_out, w_out = (h + stride - 1) // stride, (w + stride - 1) // stride
        if pool > 1 and min(h_out, w_out) < 2:
            raise ConfigError(
                f"input {in_shape[1]}x{in_shape[2]} is too small for this VGG: block "
                f"conv{len(specs) + 1} would max-pool a {h_out}x{w_out} map; use inputs of at "
                "least 16x16 (e.g. data.name = mnist-10k) or the mlp model"
            )
        specs.append(
            BlockSpec(
                name=f"conv{len(specs) + 1}",
                kind="conv",
                make=lambda c=c, c_out=c_out, k=kernel, s=stride: conv_block(
                    c, c_out, k, s, cfg
                ),
                in_shape=(c, h, w),
                out_shape=(c_out, h_out, w_out),
                pool=pool,
                dropout=cfg.dropout,
                channel_dropout=cfg.conv_dropout == "channel",
            )
        )
        c, h, w = specs[-1].wire_shape
    d_in = flat_size((c, h, w))
    specs.append(
        BlockSpec(
            name="fc1",
            kind="fc",
            make=lambda: fc_block(d_in, cfg.fc_width, cfg),
            in_shape=(c, h, w),
            out_shape=(cfg.fc_width,),
            dropout=cfg.dropout,
        )
    )
    specs.append(
        BlockSpec(
            name="out",
            kind="output",
            make=lambda: nn.Linear(cfg.fc_width, num_classes),
            in_shape=(cfg.fc_width,),
            out_shape=(num_classes,),
        )
    )
    return specs


for _name, _layout in VGG_LAYOUTS.items():
    register_model(_name)(
        lambda cfg, in_shape, num_classes, _layout=_layout: build_vgg(
            _layout, cfg, in_shape, num_classes
        )
    )
