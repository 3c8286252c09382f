"""The convolutional networks of Mostafa, Ramesh & Cauwenberghs (2018), one block per layer.

    mostafa-cnn5:  conv5x5-96 - mp3s2 - conv5x5-128 - mp3s2 - conv5x5-256 - mp3s2 - fc2048 -
                   fc2048 - fc   (their CIFAR-10 net, after Srivastava et al. 2014)
    mostafa-cnn10: C64-C64-MP-C128-C128-MP-C256-C256-MP-C512-C512-MP-C512-C512-MP - fc
                   (3x3 convs, 2x2 max-pools)

Every layer is batch-normalised (conv/linear - BN - ReLU). Dropout (``model.dropout``) is
applied after each max-pool and after each fully connected layer, and on the input images
with ``model.input_dropout`` (the paper: "after the input layer, after each max-pooling
layer, and after each fully connected layer"); the paper does not give the rates. The 3x3
stride-2 max-pools pad by 1, so 32x32 maps go to 16, 8 and 4, which matches the paper's
count of 40,960 activations per sample. ``model.width`` scales every layer (1.0 = the paper).
The paper's 3x1000 MNIST network is ``mlp`` with ``hidden = 1000, depth = 3``.
"""

from __future__ import annotations

from torch import nn

from pipelocal.config import ConfigError, ModelConfig
from pipelocal.models.base import BlockSpec, flat_size, register_model
from pipelocal.models.vgg import conv_block, fc_block

__all__ = ["build_mostafa_cnn"]

# (channels, kernel, max-pool (kernel, stride, padding) after it or None) per conv layer.
_CNN5 = [(96, 5, (3, 2, 1)), (128, 5, (3, 2, 1)), (256, 5, (3, 2, 1))]
_CNN10 = [(c, 3, pool) for c in (64, 128, 256, 512, 512) for pool in (None, (2, 2, 0))]


def build_mostafa_cnn(
    layers: list, fcs: int, cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int
) -> list[BlockSpec]:
    if len(in_shape) != 3:
        raise ConfigError(f"conv models need image inputs [C, H, W]; got input shape {in_shape}")
    specs: list[BlockSpec] = []
    c, h, w = in_shape
    for c_out, kernel, pool in layers:
        c_out = max(1, round(c_out * cfg.width))
        k, s, p = pool or (1, 0, 0)
        spec = BlockSpec(
            name=f"conv{len(specs) + 1}",
            kind="conv",
            make=lambda c=c, c_out=c_out, kernel=kernel: conv_block(c, c_out, kernel, 1, cfg),
            in_shape=(c, h, w),
            out_shape=(c_out, h, w),
            pool=k, pool_stride=s, pool_padding=p,
            dropout=cfg.dropout if pool else 0.0,
            channel_dropout=cfg.conv_dropout == "channel",
            dropout_after_pool=True,
            input_dropout=cfg.input_dropout if not specs else 0.0,
        )
        c, h, w = spec.wire_shape
        if min(h, w) < 1:
            raise ConfigError(
                f"input {in_shape[1]}x{in_shape[2]} is too small for this model: block "
                f"{spec.name} would max-pool a {spec.out_shape[1]}x{spec.out_shape[2]} map to "
                "nothing; use 32x32 inputs (CIFAR-10) as the paper"
            )
        specs.append(spec)
    d, width = flat_size((c, h, w)), max(1, round(2048 * cfg.width))
    for i in range(fcs):
        specs.append(BlockSpec(
            name=f"fc{i + 1}", kind="fc", make=lambda d=d: fc_block(d, width, cfg),
            in_shape=(c, h, w) if i == 0 else (width,), out_shape=(width,),
            dropout=cfg.dropout,
        ))
        d = width
    last = specs[-1].wire_shape
    specs.append(BlockSpec(
        name="out", kind="output",
        make=lambda: nn.Sequential(nn.Flatten(), nn.Linear(flat_size(last), num_classes)),
        in_shape=last, out_shape=(num_classes,),
    ))
    return specs


register_model("mostafa-cnn5")(
    lambda cfg, in_shape, num_classes: build_mostafa_cnn(_CNN5, 2, cfg, in_shape, num_classes)
)
register_model("mostafa-cnn10")(
    lambda cfg, in_shape, num_classes: build_mostafa_cnn(_CNN10, 0, cfg, in_shape, num_classes)
)
