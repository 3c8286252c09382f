"""The interface every local learning rule implements."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.config import RuleConfig
from pipelocal.registry import Registry

__all__ = ["RULES", "LocalRule", "Pooling", "register_rule"]

RULES: Registry[type[LocalRule]] = Registry("rule")
register_rule = RULES.register


class LocalRule(nn.Module):
    """Attached to one hidden block; owns the block's auxiliary heads and computes its loss.

    ``loss(h, y)`` takes the block's output ``h`` ([B, C, H, W] for conv blocks, [B, D] for fc
    blocks) and returns ``(loss, logits)`` where ``logits`` are the local classifier's class
    scores [B, num_classes] (None if the rule has no classifier). Gradients reach only this
    block: the block's input is always detached.
    """

    is_global: ClassVar[bool] = False
    """True for rules that backpropagate through the whole model (not pipelinable)."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.cfg = cfg

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def logits(self, h: Tensor) -> Tensor | None:
        """Class scores of the local classifier, for evaluation (None if there is none)."""
        return None


class Pooling(nn.Module):
    """Average pooling of conv features to the paper's decoder input size, then flatten."""

    def __init__(self, shape: tuple[int, ...], dim: int) -> None:
        super().__init__()
        from pipelocal.rules.functional import pooled_size

        self.size = pooled_size(shape, dim)
        self.pool = len(shape) == 3 and self.size != tuple(shape)
        self.out_features = 1
        for d in self.size:
            self.out_features *= d

    def forward(self, h: Tensor) -> Tensor:
        if self.pool:
            h = F.adaptive_avg_pool2d(h, self.size[1:])
        return h.flatten(1)
