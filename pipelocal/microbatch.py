"""Micro-batches: how a training batch is split, and which part of it a micro-batch is.

With ``pipeline.micro_batches = M`` every block trains on a batch of B rows in
``min(M, B)`` consecutive micro-batches whose sizes differ by at most one row, the first ones
larger (B = 10, M = 4: 3, 3, 2, 2). A batch of fewer than M rows (a short last batch) splits
into one-row micro-batches: never an empty one. Each micro-batch's loss is weighted by its
share of the rows, ``rows / B``, so that the gradients a block accumulates over the batch are
those of the batch mean, and the block steps once, after its last micro-batch.

The split is a pure function of (B, M): a stage that receives micro-batch i of a batch knows
its weight from the header alone, and an engine fed the concatenated output of another splits
it back into the very same micro-batches. No micro-batch of a batch of at most
``data.batch_size`` rows has more than :func:`wire_rows` rows: the pipeline's wire buffers
have that many, and evaluation runs in pieces of that size on every path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

__all__ = ["WHOLE", "MicroBatch", "micro_batch_sizes", "split_batch", "wire_rows"]


def micro_batch_sizes(rows: int, micro_batches: int) -> list[int]:
    """Sizes of the micro-batches of a batch of ``rows`` rows: ``min(micro_batches, rows)``
    of them, as even as rows allow, the first ones larger; [] for an empty batch."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches = {micro_batches}; accepted: an integer >= 1")
    count = min(micro_batches, rows)
    if count == 0:
        return []
    base, extra = divmod(rows, count)
    return [base + 1] * extra + [base] * (count - extra)


def wire_rows(batch_size: int, micro_batches: int) -> int:
    """The most rows a micro-batch of a batch of at most ``batch_size`` rows has:
    ceil(batch_size / micro_batches) (``batch_size`` itself with one micro-batch)."""
    return -(-batch_size // micro_batches)


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """Micro-batch ``index`` of ``count`` of a batch of ``batch_rows`` rows."""

    index: int = 0
    count: int = 1
    batch_rows: int = 0
    """Rows of the whole batch (0: the micro-batch is the whole batch, whatever its size)."""

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    @property
    def whole(self) -> bool:
        """The micro-batch is the whole batch (M = 1, or a batch of one row)."""
        return self.count == 1

    def weight(self, rows: int) -> float:
        """The share of the batch's rows in a micro-batch of ``rows`` rows (1.0 if whole)."""
        return 1.0 if self.whole else rows / self.batch_rows


WHOLE = MicroBatch()
"""The whole batch as one micro-batch: what every step is with ``micro_batches = 1``."""


def split_batch(
    tensors: tuple[Tensor | None, ...], micro_batches: int
) -> Iterator[tuple[MicroBatch, tuple[Tensor | None, ...]]]:
    """The micro-batches of a batch: ``(part, views)`` per micro-batch, in order.

    ``tensors`` share their first dimension (the rows); None entries stay None. The views
    are slices of the batch along rows (no copy).
    """
    rows = next(int(t.shape[0]) for t in tensors if t is not None)
    sizes = micro_batch_sizes(rows, micro_batches)
    if len(sizes) <= 1:
        yield WHOLE, tensors
        return
    start = 0
    for i, size in enumerate(sizes):
        part = MicroBatch(i, len(sizes), rows)
        yield part, tuple(None if t is None else t[start:start + size] for t in tensors)
        start += size
