"""Feedback alignment (Lillicrap et al. 2016), the global baseline of Mostafa et al. (2018).

The output's cross-entropy is backpropagated through the whole model, as with ``glob``, except
that every linear and conv layer sends its error down through a fixed random matrix B (of the
weight's shape) instead of its own weight. Activation derivatives, max-pool routing, dropout
masks and batch norm backpropagate as usual (the paper: "the layer's activation derivative is
still used"; BN's scale is trained by the fed-back errors). Like ``glob`` it is a global rule:
single process only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pipelocal.rules.base import LocalRule, register_rule
from pipelocal.rules.functional import Conv2dFA, LinearFA

__all__ = ["FARule", "feedback_align"]


def feedback_align(module: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` below ``module`` by its feedback
    alignment twin sharing the same parameters; B is drawn from the current RNG (the caller
    seeds it from the block's own seed). Returns the (possibly replaced) ``module``."""
    if isinstance(module, nn.Linear):
        return LinearFA.from_linear(module)
    if isinstance(module, nn.Conv2d):
        return Conv2dFA(module)
    for name, child in module.named_children():
        setattr(module, name, feedback_align(child))
    return module


@register_rule("fa")
class FARule(LocalRule):
    is_global: ClassVar[bool] = True
    feedback_alignment: ClassVar[bool] = True

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        return h.new_zeros((), dtype=torch.float32), None  # float32 as every loss
