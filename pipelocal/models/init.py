"""Weight initialisation schemes (``model.init``), applied to a block and its rule's heads.

* ``pytorch``: every layer keeps PyTorch's default; under a local rule with ``rule.zero_init``
  the output layer's weight starts at zero (Nøkland & Eidnes's code).
* ``he-normal``: every Conv2d weight of the block and of its rule's auxiliary nets is drawn
  from normal(0, sqrt(2 / (k_h k_w C_out))), BatchNorm2d starts at weight 1, bias 0; conv
  biases and linear layers (the output classifier included) keep PyTorch's default. This is the
  AugLocal authors' ResNet (``LocalResNet.__init__``), which trains AugLocal, DGL and InfoPro.
* ``auto``: the scheme of the rule's authors (:attr:`LocalRule.authors_init
  <pipelocal.rules.base.LocalRule.authors_init>`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["INITS", "he_normal_"]

INITS = ("auto", "pytorch", "he-normal")
"""Names accepted in ``model.init``."""


@torch.no_grad()
def he_normal_(module: nn.Module) -> None:
    """Re-draw every Conv2d weight below ``module`` from normal(0, sqrt(2 / (k_h k_w C_out)))
    (the global CPU generator: the caller seeds it) and reset BatchNorm2d to weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()
