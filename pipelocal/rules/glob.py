"""Baselines trained end to end by backprop: ``glob`` and ``glob+sim`` (Nøkland & Eidnes, app. B).

They mark the block as part of a global model: the engine then backpropagates the output's
cross-entropy (plus, for glob+sim, every hidden block's sim loss) through all blocks. They
cannot run as a pipeline, since gradients would have to travel backward between stages.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pipelocal.config import RuleConfig
from pipelocal.rules.base import LocalRule, register_rule
from pipelocal.rules.predsim import PredSimRule

__all__ = ["GlobRule", "GlobSimRule"]


@register_rule("glob")
class GlobRule(LocalRule):
    is_global: ClassVar[bool] = True

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        return h.new_zeros((), dtype=torch.float32), None  # float32 as every loss


@register_rule("glob+sim")
class GlobSimRule(PredSimRule):
    is_global: ClassVar[bool] = True
    couples_samples: ClassVar[bool] = True  # every hidden block's sim loss

    def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
        self.pred_weight, self.sim_weight, self.bpf = 0.0, 1.0, False
        super().__init__(shape, num_classes, cfg)
