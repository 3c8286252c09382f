"""Mostafa, Ramesh & Cauwenberghs (2018): local errors from fixed random classifiers.

Each hidden block i scores its flattened passed-on activation y (after dropout, and for conv
blocks after max-pooling, as the paper places it) with a classifier M [classes, N]:
s = M y, and learns from the local loss E(t, s) (cross-entropy or square hinge,
``rule.classifier_loss``). The error reaches y through K [N, classes]:

| rule   | M                     | K                                                        |
|--------|-----------------------|----------------------------------------------------------|
| `sym`  | fixed, random         | M^T: the exact gradient of E                              |
| `scfb` | fixed, random         | fixed, random magnitudes, sign(K) = sign(M^T)            |
| `tlc`  | trainable, random init| M^T (exact gradient; M is trained by the block's optimiser)|

M and K are drawn with zero mean and std sqrt(2 / (N + classes)) (the paper's eq. 7),
uniform or Gaussian (``rule.classifier_init``). The fixed ones are not stored: as the paper
proposes for hardware, only their seed is (the module's extra state), and they are
regenerated from it, so checkpoints stay small and portable.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.config import RuleConfig
from pipelocal.rules.base import LocalRule, register_rule
from pipelocal.rules.functional import label_onehot, linear_fa

__all__ = ["FixedClassifierRule", "draw_fixed", "square_hinge"]


def draw_fixed(seed: int, classes: int, features: int, init: str) -> tuple[Tensor, Tensor]:
    """(M, R): two independent [classes, features] random matrices from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    std = math.sqrt(2.0 / (features + classes))
    out = []
    for _ in range(2):
        if init == "gaussian":
            out.append(torch.randn(classes, features, generator=gen) * std)
        else:  # uniform with the same std: U(-sqrt(3) std, sqrt(3) std)
            out.append((torch.rand(classes, features, generator=gen) * 2 - 1) * std * math.sqrt(3))
    return out[0], out[1]


def square_hinge(scores: Tensor, y: Tensor) -> Tensor:
    """One-vs-all square hinge: mean over the batch of sum_c max(0, 1 - t_c s_c)^2, t = +-1."""
    t = 2.0 * label_onehot(y, scores.size(1)).to(scores.dtype) - 1.0
    return F.relu(1.0 - t * scores).pow(2).sum(1).mean()


class FixedClassifierRule(LocalRule):
    classifier_reads_passed_on: ClassVar[bool] = True
    feedback: ClassVar[str] = "sym"
    """sym: K = M^T; scfb: sign-concordant random K; tlc: M trainable, K = M^T."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(shape, num_classes, cfg)
        self.features = math.prod(shape)
        # Drawn from the block-seeded RNG LocalBlock forks around rule construction.
        self.seed = int(torch.randint(0, 2**62, ()).item())
        m, k = self._draw(self.seed)
        if self.feedback == "tlc":
            self.classifier = nn.Parameter(m)
        else:
            self.register_buffer("classifier", m, persistent=False)
        if self.feedback == "scfb":
            self.register_buffer("feedback_t", k, persistent=False)  # K^T, [classes, N]

    def _draw(self, seed: int) -> tuple[Tensor, Tensor]:
        m, r = draw_fixed(seed, self.num_classes, self.features, self.cfg.classifier_init)
        return m, r.abs() * m.sign()  # K^T: random magnitudes, the signs of M

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Regenerate the fixed matrices from the stored seed (tlc's M is a parameter)."""
        self.seed = int(state["seed"])
        m, k = self._draw(self.seed)
        with torch.no_grad():
            if self.feedback != "tlc":
                self.classifier.copy_(m)
            if self.feedback == "scfb":
                self.feedback_t.copy_(k)

    def scores(self, h: Tensor) -> Tensor:
        z = h.flatten(1)  # [B, N]
        if self.feedback == "scfb":
            return linear_fa(z, self.classifier, None, self.feedback_t)
        return F.linear(z, self.classifier)  # [B, classes]

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        s = self.scores(h)
        loss = F.cross_entropy(s, y) if self.cfg.classifier_loss == "ce" else square_hinge(s, y)
        return loss, s.detach()

    def logits(self, h: Tensor) -> Tensor | None:
        return self.scores(h)


for _name in ("sym", "scfb", "tlc"):
    register_rule(_name)(
        type(f"Rule_{_name}", (FixedClassifierRule,), {"feedback": _name})
    )
