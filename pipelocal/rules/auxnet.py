"""Rules whose local loss is the cross-entropy of an auxiliary network on the block's output."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.config import ConfigError
from pipelocal.rules.base import LocalRule

__all__ = ["AuxNetRule", "conv_shape"]


def conv_shape(shape: tuple[int, ...], rule: str) -> tuple[int, int, int]:
    """``shape`` as (C, H, W), or a ConfigError: ``rule``'s auxiliary net needs conv features."""
    if len(shape) != 3:
        raise ConfigError(
            f"rule {rule!r} builds a convolutional auxiliary net, but a hidden block outputs "
            f"features of shape {tuple(shape)}; use a model whose hidden blocks are all conv "
            "blocks (resnet32, resnet110, vgg19, ...)"
        )
    c, h, w = shape
    return c, h, w


class AuxNetRule(LocalRule):
    """loss = cross-entropy(aux(h), y); ``self.aux`` maps the block output to class scores."""

    aux: nn.Module

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        scores = self.aux(h)  # [B, num_classes]
        return F.cross_entropy(scores, y), scores.detach()

    def logits(self, h: Tensor) -> Tensor | None:
        return self.aux(h)
