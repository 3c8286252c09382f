"""The order of one epoch: which sample indices make up each batch.

Both samplers draw only from the epoch generator passed in, so an epoch's batches are a pure
function of its seed. Every sample appears in exactly one batch per epoch.
"""

from __future__ import annotations

import torch

__all__ = ["EpochOrder", "class_limited_order", "sequential_order", "shuffled_order"]

EpochOrder = list[torch.Tensor]
"""One int64 index tensor per batch, in batch order."""


def sequential_order(n: int, batch_size: int) -> EpochOrder:
    """0 .. n-1 in order, cut into batches of ``batch_size`` (the last may be smaller)."""
    return list(torch.arange(n).split(batch_size))


def shuffled_order(n: int, batch_size: int, generator: torch.Generator) -> EpochOrder:
    """A random permutation of 0 .. n-1, cut into batches (no drop_last)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _round_robin_takes(remaining: list[int], batch_size: int) -> list[int]:
    """How many samples each class gives when a batch is filled one per class in turn."""
    takes, left = [0] * len(remaining), batch_size
    while left > 0:
        active = [k for k, r in enumerate(remaining) if takes[k] < r]
        if not active:
            break  # the chosen classes ran out: the batch stays smaller
        if len(active) > left:
            for k in active[:left]:
                takes[k] += 1
            break
        rounds = min(min(remaining[k] - takes[k] for k in active), left // len(active))
        for k in active:
            takes[k] += rounds
        left -= rounds * len(active)
    return takes


def class_limited_order(
    labels: torch.Tensor,
    *,
    num_classes: int,
    classes_per_batch: int,
    batch_size: int,
    generator: torch.Generator,
) -> EpochOrder:
    """Batches that each hold samples of at most ``classes_per_batch`` classes.

    Each class's indices are shuffled into a queue; each batch picks ``classes_per_batch`` of
    the classes that still have samples, uniformly at random, and is filled round-robin from
    their queues up to ``batch_size``. A batch is smaller when its classes run out.
    """
    queues = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)])
    heads = [0] * num_classes
    order: EpochOrder = []
    while True:
        open_classes = [c for c in range(num_classes) if heads[c] < len(queues[c])]
        if not open_classes:
            return order
        picks = torch.randperm(len(open_classes), generator=generator)[:classes_per_batch]
        chosen = [open_classes[i] for i in picks.tolist()]
        takes = _round_robin_takes([len(queues[c]) - heads[c] for c in chosen], batch_size)
        parts, slots = [], []
        for k, (c, t) in enumerate(zip(chosen, takes)):
            parts.append(queues[c][heads[c] : heads[c] + t])
            slots.append(torch.arange(t) * len(chosen) + k)  # round j, class k -> slot j*K + k
            heads[c] += t
        order.append(torch.cat(parts)[torch.cat(slots).argsort()])
