"""DGL (Belilovsky et al. 2020): the MLP-SR auxiliary net, trained with cross-entropy.

On conv features [B, C, H, W]: adaptive average pooling to ceil(H/4) x ceil(W/4) (the "spatial
reduction"), three 1x1 conv(C -> C)-BN-ReLU, adaptive average pooling to 2x2, then a 3-layer
MLP: Linear(4C, 4C)-BN-ReLU, Linear(4C, 4C)-BN-ReLU, Linear(4C, classes). Widths follow the
authors' code (``auxillary_classifier2``: feature size = input channels, MLP width = 4x that).
On fc features [B, D] only the MLP is used, with width D.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import nn

from pipelocal.config import RuleConfig
from pipelocal.models.resample import AdaptiveAvgPool2d
from pipelocal.rules.auxnet import AuxNetRule
from pipelocal.rules.base import register_rule

__all__ = ["DGLRule", "mlp_sr"]


def _mlp(d: int, num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU()]
    return [*layers, nn.Linear(d, num_classes)]


def mlp_sr(shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    if len(shape) != 3:
        return nn.Sequential(nn.Flatten(), *_mlp(math.prod(shape), num_classes))
    c, h, w = shape
    convs: list[nn.Module] = []
    for _ in range(3):
        convs += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    reduced = (math.ceil(h / 4), math.ceil(w / 4))
    # The authors' nn.AdaptiveAvgPool2d, from kernels that are deterministic on CUDA.
    return nn.Sequential(
        AdaptiveAvgPool2d((h, w), reduced),  # [B, C, H/4, W/4]
        *convs,
        AdaptiveAvgPool2d(reduced, 2),  # [B, C, 2, 2]
        nn.Flatten(),  # [B, 4C]
        *_mlp(4 * c, num_classes),
    )


@register_rule("dgl")
class DGLRule(AuxNetRule):
    authors_init: ClassVar[str] = "he-normal"  # the AugLocal authors' ResNet
    def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(shape, num_classes, cfg)
        self.aux = mlp_sr(self.shape, num_classes)
