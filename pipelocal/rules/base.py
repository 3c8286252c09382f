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

    classifier_reads_passed_on: ClassVar[bool] = False
    """True for rules whose classifier reads what the block passes on (after dropout and
    max-pool, as Mostafa et al. place it) rather than the block's output."""

    needs_context: ClassVar[bool] = False
    """True for rules built from the model around their block: they take
    ``context=RuleContext(specs, index)`` (AugLocal, InfoPro)."""

    needs_image: ClassVar[bool] = False
    """True for rules whose loss also needs the model's input image (InfoPro)."""

    couples_samples: ClassVar[bool] = False
    """True for rules whose loss couples the samples of a batch (sim's B x B similarity
    matrix): computed per micro-batch it is another loss, not the batch's in another summation
    order, so ``pipeline.micro_batches > 1`` needs ``rule.micro_batch_similarity = true``.
    False: the loss is a mean of per-sample terms (BatchNorm in a head sees micro-batches, as
    the blocks' own BatchNorm does)."""

    feedback_alignment: ClassVar[bool] = False
    """True for ``fa``: every weight layer of every block sends its error down through a fixed
    random matrix instead of its transposed weight."""

    authors_init: ClassVar[str] = "pytorch"
    """The weight initialisation of the rule's authors, used when ``model.init = "auto"``
    (:mod:`pipelocal.models.init`): ``pytorch`` or ``he-normal``."""

    @classmethod
    def end_to_end_layers(cls, cfg: RuleConfig) -> int:
        """How many top blocks (the output block included) learn together, end to end, from
        the output loss (1: the output block alone; global rules: all of them)."""
        return 1

    @classmethod
    def output_loss_scale(cls, cfg: RuleConfig) -> float:
        """Factor on the output layer's cross-entropy under this rule (1 unless overridden)."""
        return 1.0

    def loss(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def logits(self, h: Tensor) -> Tensor | None:
        """Class scores of the local classifier, for evaluation (None if there is none)."""
        return None


class Pooling(nn.Module):
    """The authors' average pooling of conv features to at most ``dim`` features, then flatten.

    ``avg_pool2d`` with the window of :func:`~pipelocal.rules.functional.pool_window`, stride =
    window and zero padding counted in the mean (``count_include_pad=True``), as the authors'
    ``nn.AvgPool2d``. ``adaptive_avg_pool2d`` gives the same output size but other values (its
    windows overlap and never include padding); it is also the wrong choice on GPUs: its CUDA
    backward accumulates with atomic adds and is not deterministic, while ``avg_pool2d``'s
    CUDA backward is (each input gradient is gathered from its own windows), which the
    bitwise-exact pipeline needs. ``map(h)`` returns the pooled 4-D map, ``forward`` flattens.
    """

    def __init__(self, shape: tuple[int, ...], dim: int) -> None:
        super().__init__()
        from pipelocal.rules.functional import pool_window, pooled_size

        self.size = pooled_size(shape, dim)
        self.pool = len(shape) == 3 and self.size != tuple(shape)
        self.window, self.padding = pool_window(shape, dim) if self.pool else ((1, 1), (0, 0))
        self.out_features = 1
        for d in self.size:
            self.out_features *= d

    def map(self, h: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H', W'] (fc features [B, D] pass unchanged)."""
        if not self.pool:
            return h
        return F.avg_pool2d(h, self.window, self.window, self.padding, count_include_pad=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.map(h).flatten(1)
