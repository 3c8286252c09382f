"""AugLocal (Ma et al. 2024): auxiliary nets built from copies of the block's later layers.

For hidden layer j (0-based) of a network of L layers (the output layer is layer L - 1) and a
depth limit d (``rule.aux_depth``):

* **Top layers** (``rule.top_layers``): with ``backprop`` (the authors' code: ``train.py``
  subtracts ``--aux_net_depth`` from the number of local modules) the last d + 1 layers and the
  classifier learn end to end from the output loss, and only layers 0 .. L_m - 2 have
  auxiliary nets, with L_m = L - d; with ``local`` every hidden layer does, L_m = L.
* **Pyramidal depth:** d_j = max(1, round(d (1 - r_j) + r_j)) with r_j = j tau / (L_m - 2)
  and tau = ``rule.pyramid_tau`` (0.5 in the paper): d at layer 0, falling linearly towards
  d (1 - tau) + tau at the last layer with an auxiliary net.
* **Selection:** index_i = round(j + (L - 1 - j) / d_j i) for i = 1..d_j over all L layers,
  with Python's ``round`` (halves to even), as the authors' code does. The last layer
  (i = d_j) is always selected; when at most d_j layers follow j, all of them are used.
* **Construction:** fresh copies of the selected layers (each model block's
  :class:`~pipelocal.models.base.LayerTemplate`), chained: each copy takes the channels of the
  one before it (the first: the block's own channels) and downsamples with stride 2 where its
  width at least doubles. The head is global average pooling, BatchNorm1d when the aux net has
  at most one copied layer, and a linear classifier. Loss: cross-entropy.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pipelocal.config import ConfigError, RuleConfig
from pipelocal.rules.auxnet import AuxNetRule, conv_shape
from pipelocal.rules.base import register_rule
from pipelocal.rules.context import RuleContext

__all__ = ["AugLocalRule", "aux_layers", "build_aux_net", "pyramid_depth", "select_layers"]


def pyramid_depth(j: int, num_modules: int, d: int, tau: float) -> int:
    """d_j = max(1, round(d (1 - r_j) + r_j)), r_j = j tau / (L_m - 2), L_m = ``num_modules``
    (the layers with an auxiliary net, plus one)."""
    r = j * tau / (num_modules - 2) if num_modules > 2 else 0.0
    return max(1, round(d * (1 - r) + r))


def select_layers(j: int, num_layers: int, d: int) -> list[int]:
    """Indices round(j + (L - 1 - j) / d i), i = 1..d; all of j+1..L-1 if at most d follow."""
    remaining = num_layers - 1 - j
    if remaining <= d:
        return list(range(j + 1, num_layers))
    return [round(j + remaining / d * i) for i in range(1, d + 1)]  # the authors' order of ops


def aux_layers(j: int, num_layers: int, d: int, tau: float, num_modules: int = 0) -> list[int]:
    """The layers copied into hidden layer j's auxiliary net (pyramidal depth over
    ``num_modules`` = L_m, 0 = L, then selection over all ``num_layers`` = L)."""
    return select_layers(j, num_layers, pyramid_depth(j, num_modules or num_layers, d, tau))


def build_aux_net(
    shape: tuple[int, int, int], context: RuleContext, layers: list[int], num_classes: int
) -> nn.Sequential:
    """Copies of ``layers`` chained on features of ``shape``, then GAP (+ BN1d) + linear."""
    c = shape[0]
    copies: list[nn.Module] = []
    for k in layers:
        template = context.specs[k].template
        if template is None:
            raise ConfigError(
                f"rule 'auglocal' copies block {context.specs[k].name} into the auxiliary net "
                f"of block {context.specs[context.index].name}, but the model does not say how "
                "to copy it (BlockSpec.template); use resnet32, resnet110, vgg19, ..."
            )
        stride = 2 if template.out_channels >= 2 * c else 1  # the width grows: downsample
        copies.append(template.make(c, stride))
        c = template.out_channels
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if len(copies) <= 1:
        head.append(nn.BatchNorm1d(c))
    head.append(nn.Linear(c, num_classes))
    return nn.Sequential(*copies, *head)


@register_rule("auglocal")
class AugLocalRule(AuxNetRule):
    authors_init: ClassVar[str] = "he-normal"  # the AugLocal authors' ResNet
    needs_context: ClassVar[bool] = True

    @classmethod
    def end_to_end_layers(cls, cfg: RuleConfig) -> int:
        return cfg.aux_depth + 1 if cfg.top_layers == "backprop" else 1

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, cfg: RuleConfig, *, context: RuleContext
    ) -> None:
        super().__init__(shape, num_classes, cfg)
        features = conv_shape(shape, "auglocal")
        j, num_layers = context.index, context.num_layers
        num_modules = num_layers - self.end_to_end_layers(cfg) + 1  # L_m
        if j > num_modules - 2:
            raise ValueError(
                f"block {context.specs[j].name} (layer {j}) is one of the top "
                f"{num_layers - num_modules + 1} layers that learn end to end from the output "
                f"loss (rule.top_layers = {cfg.top_layers!r}, rule.aux_depth = "
                f"{cfg.aux_depth}); it has no auxiliary net: build rules for layers 0.."
                f"{num_modules - 2} only (engine.build_blocks does)"
            )
        self.layers = aux_layers(j, num_layers, cfg.aux_depth, cfg.pyramid_tau, num_modules)
        self.aux = build_aux_net(features, context, self.layers, num_classes)
