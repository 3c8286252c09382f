"""What a rule may know about the model around its block, beyond the block's output shape.

Most rules need only ``(shape, num_classes, cfg)``. A rule class that sets
``needs_context = True`` is built with ``context=RuleContext(specs, index)`` as well: AugLocal
copies later blocks into its auxiliary net, InfoPro interpolates its loss weights over the
block index and reconstructs the model's input image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipelocal.models.base import BlockSpec

__all__ = ["RuleContext"]


@dataclass(frozen=True)
class RuleContext:
    specs: Sequence[BlockSpec]
    """Every block of the model, in order (the output block last)."""
    index: int
    """The index of the block this rule is attached to."""
    image_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(mean, std) per channel the model's input was normalised with (InfoPro un-normalises
    its reconstruction target with them); None where no rule needs them."""

    @property
    def num_layers(self) -> int:
        """L: the number of local layers, the output block included."""
        return len(self.specs)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the model's input [C, H, W]."""
        return tuple(self.specs[0].in_shape)

    @property
    def max_channels(self) -> int:
        """The widest conv block's channel count (0 if there is no conv block)."""
        return max((s.out_shape[0] for s in self.specs if len(s.out_shape) == 3), default=0)
