"""Nøkland & Eidnes (2019): the pred, sim and predsim local losses and their bpf variants.

One class computes ``(1 - beta) * pred + beta * sim`` and each registered rule fixes the weights:

| rule          | pred head                               | sim head                          |
|---------------|-----------------------------------------|-----------------------------------|
| pred          | avg-pool, linear, cross-entropy         | -                                 |
| sim           | -                                       | conv3x3 (linear for fc), MSE      |
| predsim       | both, beta = rule.beta                  |                                   |
| pred-bpf      | avg-pool, feedback-alignment linear,    | -                                 |
|               | BCE against binarised label projection  |                                   |
| sim-bpf       | -                                       | no head: pooled 4-D map vs        |
|               |                                         | random projection of the labels   |
| predsim-bpf   | both bpf heads, beta = rule.beta        |                                   |

As in the authors' code (anokland/local-loss ``train.py``): the classifier's weight starts at
zero (a bpf classifier's bias too), unless ``rule.zero_init = false``; the similarity matrix
of a conv map uses per-channel standard deviations unless ``rule.similarity_std = false``;
with both losses the output layer's cross-entropy is scaled by (1 - beta)
(:meth:`PredSimRule.output_loss_scale`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.config import RuleConfig
from pipelocal.rules.base import LocalRule, Pooling, register_rule
from pipelocal.rules.functional import LinearFA, label_onehot, similarity_matrix

__all__ = ["PredSimRule"]


class PredSimRule(LocalRule):
    pred_weight: float = 0.0
    sim_weight: float = 0.0
    bpf: bool = False
    combined: ClassVar[bool] = False
    """True for predsim and predsim-bpf: (1 - beta) pred + beta sim."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(shape, num_classes, cfg)
        self.pool = Pooling(shape, cfg.dim_in_decoder)
        if self.bpf:
            # Fixed random label projection P [proj, classes]; never trained.
            proj = nn.Linear(num_classes, cfg.target_proj_size, bias=False).weight.detach()
            self.register_buffer("label_proj", proj.clone())
        if self.pred_weight > 0:
            out = cfg.target_proj_size if self.bpf else num_classes
            linear = LinearFA if self.bpf else nn.Linear
            self.decoder = linear(self.pool.out_features, out)
            if cfg.zero_init:  # the authors' decoder_y.weight.data.zero_(); LinearFA: bias 0 too
                nn.init.zeros_(self.decoder.weight)
                if self.bpf:
                    nn.init.zeros_(self.decoder.bias)
        if self.sim_weight > 0 and not self.bpf:
            if len(shape) == 3:
                self.sim_head: nn.Module = nn.Conv2d(shape[0], shape[0], 3, padding=1, bias=False)
            else:
                self.sim_head = nn.Linear(shape[0], shape[0], bias=False)

    @classmethod
    def output_loss_scale(cls, cfg: RuleConfig) -> float:
        """The authors scale the output layer's cross-entropy by (1 - beta) with predsim(-bpf)."""
        return 1.0 - cfg.beta if cls.combined and cfg.scale_output_loss else 1.0

    def _codes(self) -> Tensor:
        """bpf: binarised projected label of every class, [classes, proj] in {0, 1}."""
        return (self.label_proj.t() > 0).to(self.label_proj.dtype)

    def _class_scores(self, z: Tensor) -> Tensor:
        if not self.bpf:
            return z
        # Log-likelihood of each class's binary code under sigmoid(z): [B, classes].
        codes = self._codes()
        return F.logsigmoid(z) @ codes.t() + F.logsigmoid(-z) @ (1 - codes).t()

    def _pred(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = self.decoder(self.pool(h))
        if self.bpf:
            loss = F.binary_cross_entropy_with_logits(z, self._codes()[y])
        else:
            loss = F.cross_entropy(z, y)
        return loss, z

    def _sim(self, h: Tensor, y: Tensor) -> Tensor:
        onehot = label_onehot(y, self.num_classes)
        use_std = self.cfg.similarity_std
        if self.bpf:
            # The authors' --bio sim: the pooled map stays 4-D, so its per-channel spread counts.
            rh = similarity_matrix(self.pool.map(h), use_std=use_std)
            ry = similarity_matrix(onehot @ self.label_proj.t())
        else:
            rh = similarity_matrix(self.sim_head(h), use_std=use_std)
            ry = similarity_matrix(onehot)
        return F.mse_loss(rh, ry)

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        total = h.new_zeros((), dtype=torch.float32)
        z = None
        if self.pred_weight > 0:
            loss_pred, z = self._pred(h, y)
            total = total + self.pred_weight * loss_pred
        if self.sim_weight > 0:
            total = total + self.sim_weight * self._sim(h, y)
        return total, None if z is None else self._class_scores(z.detach())

    def logits(self, h: Tensor) -> Tensor | None:
        if self.pred_weight <= 0:
            return None
        return self._class_scores(self.decoder(self.pool(h)))


def _variant(name: str, *, pred: float | None, sim: float | None, bpf: bool) -> None:
    """Register a PredSimRule subclass; None weights mean (1 - beta, beta) from the config."""

    class Rule(PredSimRule):
        combined = pred is None and sim is None
        couples_samples = sim is None or sim > 0  # the B x B similarity matrix

        def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
            self.pred_weight = 1.0 - cfg.beta if pred is None else pred
            self.sim_weight = cfg.beta if sim is None else sim
            self.bpf = bpf
            super().__init__(shape, num_classes, cfg)

    Rule.__name__ = Rule.__qualname__ = "Rule_" + name.replace("-", "_")
    register_rule(name)(Rule)


_variant("pred", pred=1.0, sim=0.0, bpf=False)
_variant("sim", pred=0.0, sim=1.0, bpf=False)
_variant("predsim", pred=None, sim=None, bpf=False)
_variant("pred-bpf", pred=1.0, sim=0.0, bpf=True)
_variant("sim-bpf", pred=0.0, sim=1.0, bpf=True)
_variant("predsim-bpf", pred=None, sim=None, bpf=True)
