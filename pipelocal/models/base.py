"""A model is an ordered list of :class:`BlockSpec`: the unit that becomes a pipeline stage."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from pipelocal.config import ModelConfig
from pipelocal.registry import Registry

__all__ = ["MODELS", "BlockSpec", "LayerTemplate", "ModelBuilder", "register_model"]


@dataclass(frozen=True)
class LayerTemplate:
    """How to build a fresh copy of a block's feature layer with other input channels / stride.

    AugLocal (Ma et al. 2024) builds a hidden block's auxiliary network from copies of later
    blocks; ``make(c_in, stride)`` returns such a copy (for the output block: its feature layer
    without the classifier), mapping [B, c_in, H, W] to [B, out_channels, H/stride, W/stride].
    """

    out_channels: int
    make: Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class BlockSpec:
    """One locally trained block, described before it is built.

    ``make()`` builds the body (layers up to and including the nonlinearity); the block's local
    rule sees the body's output, of per-sample shape ``out_shape``. What the block passes on is
    ``maxpool(dropout(output.detach()))`` (``dropout(maxpool(...))`` if ``dropout_after_pool``),
    of shape ``wire_shape``. The output block's body ends in the class scores and is trained
    with cross-entropy.
    """

    name: str
    kind: Literal["conv", "fc", "output"]
    make: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    pool: int = 1
    """Max-pool kernel applied to the output before it is passed on; 1 = none."""
    pool_stride: int = 0
    """Max-pool stride; 0 = the kernel (non-overlapping windows)."""
    pool_padding: int = 0
    dropout: float = 0.0
    template: LayerTemplate | None = None
    """Copyable feature layer, for rules whose auxiliary nets reuse later blocks (AugLocal)."""
    channel_dropout: bool = False
    """Drop whole feature maps (mask [B, C, 1, 1], as ``nn.Dropout2d``) instead of single values;
    the authors' conv blocks do this."""
    dropout_after_pool: bool = False
    """Dropout after the max-pool instead of before it (Mostafa et al.'s placement)."""
    input_dropout: float = 0.0
    """Dropout on the block's input (Mostafa et al.'s dropout after the input layer)."""

    @property
    def wire_shape(self) -> tuple[int, ...]:
        if self.pool == 1:
            return self.out_shape
        c, h, w = self.out_shape
        k, s, p = self.pool, self.pool_stride or self.pool, self.pool_padding
        return (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], list[BlockSpec]]
MODELS: Registry[ModelBuilder] = Registry("model")
register_model = MODELS.register


def nonlinearity(name: str) -> nn.Module:
    return nn.LeakyReLU(0.01) if name == "leaky_relu" else nn.ReLU()


def flat_size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
