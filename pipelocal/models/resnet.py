"""ResNets with one locally trained block per residual block (skip connection included).

CIFAR ResNet-32 / ResNet-110 (He et al. 2016, sec. 4.2): a 3x3 conv stem (16 channels) and
three stages of n = 5 / 18 basic blocks with 16, 32, 64 channels; 1 + 3n = 16 / 55 local
layers, as in Ma et al. (2024). ImageNet ResNet-34 / ResNet-101: a 7x7 stride-2 stem with a
3x3 stride-2 max-pool and stages of [3, 4, 6, 3] basic / [3, 4, 23, 3] bottleneck blocks;
17 / 34 local layers. The last residual block is the output block: block, global average
pool, linear classifier. A shortcut that changes shape is a 1x1 conv + BN. ``model.width``
multiplies every channel count (a narrow ResNet for CPU runs).

Every block carries a :class:`~pipelocal.models.base.LayerTemplate`, so AugLocal can build
auxiliary networks from fresh copies of later blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipelocal.config import ConfigError, ModelConfig
from pipelocal.models.base import BlockSpec, LayerTemplate, register_model

__all__ = ["BasicBlock", "Bottleneck", "build_cifar_resnet", "build_imagenet_resnet"]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)): [B, c_in, H, W] -> [B, p, H/s, W/s]."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(c_in, planes, 3, stride), nn.ReLU(), *_conv_bn(planes, planes, 3, 1)
        )
        self.shortcut = _shortcut(c_in, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand to 4 * planes, plus the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(c_in, planes, 1, 1), nn.ReLU(),
            *_conv_bn(planes, planes, 3, stride), nn.ReLU(),
            *_conv_bn(planes, c_out, 1, 1),
        )
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def _down(size: int, stride: int) -> int:
    return (size + stride - 1) // stride  # conv with padding k // 2: ceil(size / stride)


def _stages(
    specs: list[BlockSpec],
    shape: tuple[int, int, int],
    *,
    block: type[BasicBlock] | type[Bottleneck],
    depths: list[int],
    planes: list[int],
    first_stride: int,
    num_classes: int,
) -> None:
    """Append one spec per residual block; the very last one becomes the output block."""
    c, h, w = shape
    total, built = sum(depths), 0
    for s, (n, p) in enumerate(zip(depths, planes)):
        for b in range(n):
            stride = (first_stride if s == 0 else 2) if b == 0 else 1
            c_out, h_out, w_out = p * block.expansion, _down(h, stride), _down(w, stride)
            template = LayerTemplate(c_out, lambda c_in, st, p=p: block(c_in, p, st))
            built += 1
            last = built == total

            def make(c=c, p=p, stride=stride, last=last) -> nn.Module:
                body = block(c, p, stride)
                if not last:
                    return body
                head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(p * block.expansion,
                                                                          num_classes)]
                return nn.Sequential(body, *head)

            specs.append(
                BlockSpec(
                    name="out" if last else f"s{s + 1}b{b + 1}",
                    kind="output" if last else "conv",
                    make=make,
                    in_shape=(c, h, w),
                    out_shape=(num_classes,) if last else (c_out, h_out, w_out),
                    template=template,
                )
            )
            c, h, w = c_out, h_out, w_out


def _scaled(channels: list[int], width: float) -> list[int]:
    return [max(1, round(c * width)) for c in channels]


def _check_image(in_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ConfigError(f"{name} needs image inputs [C, H, W]; got input shape {in_shape}")
    c, h, w = in_shape
    return c, h, w


def build_cifar_resnet(
    depth: int, cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int
) -> list[BlockSpec]:
    """ResNet-``depth`` for 32x32 images: depth = 6n + 2 layers, 1 + 3n local layers."""
    c, h, w = _check_image(in_shape, f"resnet{depth}")
    n = (depth - 2) // 6
    planes = _scaled([16, 32, 64], cfg.width)
    stem_c = planes[0]
    specs = [
        BlockSpec(
            name="stem",
            kind="conv",
            make=lambda: nn.Sequential(*_conv_bn(c, stem_c, 3, 1), nn.ReLU()),
            in_shape=(c, h, w),
            out_shape=(stem_c, h, w),
        )
    ]
    _stages(specs, (stem_c, h, w), block=BasicBlock, depths=[n, n, n], planes=planes,
            first_stride=1, num_classes=num_classes)
    return specs


def build_imagenet_resnet(
    depths: list[int],
    block: type[BasicBlock] | type[Bottleneck],
    cfg: ModelConfig,
    in_shape: tuple[int, ...],
    num_classes: int,
) -> list[BlockSpec]:
    """ImageNet ResNet: 7x7/2 conv stem + 3x3/2 max-pool (one local layer), then the stages."""
    c, h, w = _check_image(in_shape, "an ImageNet ResNet")
    planes = _scaled([64, 128, 256, 512], cfg.width)
    stem_c = planes[0]
    h_out, w_out = _down(_down(h, 2), 2), _down(_down(w, 2), 2)
    specs = [
        BlockSpec(
            name="stem",
            kind="conv",
            make=lambda: nn.Sequential(
                *_conv_bn(c, stem_c, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)
            ),
            in_shape=(c, h, w),
            out_shape=(stem_c, h_out, w_out),
        )
    ]
    _stages(specs, (stem_c, h_out, w_out), block=block, depths=depths, planes=planes,
            first_stride=1, num_classes=num_classes)
    return specs


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}")(
        lambda cfg, in_shape, num_classes, _depth=_depth: build_cifar_resnet(
            _depth, cfg, in_shape, num_classes
        )
    )

_IMAGENET = {"resnet34": ([3, 4, 6, 3], BasicBlock), "resnet101": ([3, 4, 23, 3], Bottleneck)}
for _name, (_depths, _block) in _IMAGENET.items():
    register_model(_name)(
        lambda cfg, in_shape, num_classes, _depths=_depths, _block=_block: build_imagenet_resnet(
            _depths, _block, cfg, in_shape, num_classes
        )
    )
