"""Deterministic batches: ``batch(epoch, index)`` is a pure function of its arguments.

The same (seed, epoch, index, data, settings) gives bitwise the same tensors in any process,
after any other calls and with any number of torch threads, which is what lets a pipelined run
reproduce the single-process one and a resumed run continue mid-epoch. Hence:

* the epoch's order comes from a ``torch.Generator`` seeded from (seed, epoch), cached per epoch;
* each batch's augmentation draws from its own generator seeded from (seed, epoch, index);
* the global RNG is never used.

A loader may hold its split on a CUDA device (:meth:`BatchLoader.to`): the random draws still
come from CPU generators, and every op of a batch (gather, uint8 -> float, augmentation,
normalisation) is exact elementwise arithmetic or copying, so the batch is meant to be bitwise
the one built on CPU (``tests/test_prefetch.py`` checks it where a GPU is present). One detail
serves that: 255 divides as a 0-dim tensor on the split's device, because CUDA divides by a
Python (CPU) scalar as a multiplication by its reciprocal, which can differ in the last bit.

The epoch orders are cached under a lock, so the prefetch thread (:mod:`pipelocal.data.prefetch`)
and the caller may ask for batches at the same time.

Seeds are derived with BLAKE2 over the parts (not Python's salted ``hash``), so they are the
same in every process and an order seed never equals an augmentation seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from pipelocal.data.augment import AUGMENTATIONS, apply_augmentations
from pipelocal.data.registry import Dataset, Split
from pipelocal.data.sampler import (
    EpochOrder,
    class_limited_order,
    sequential_order,
    shuffled_order,
)

if TYPE_CHECKING:
    from pipelocal.config import DataConfig

__all__ = [
    "BatchLoader",
    "derive_seed",
    "make_loaders",
]

_CACHED_EPOCHS = 2  # orders kept: the current epoch and its neighbour (a resume, an eval pass)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part and is the same in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class BatchLoader:
    """Batches of one in-memory split: float32 [B, C, H, W] normalised images, int64 [B] labels.

    ``train=True``: a new shuffle every epoch, the last batch may be smaller, ``augment`` applied
    (on [0, 1] images, before normalisation) and, while ``classes_per_batch > 0`` and
    ``epoch < classes_per_batch_until_epoch`` (or that is 0), at most that many classes per
    batch. ``train=False``: the split in its stored order, no augmentation.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        seed: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        augment: tuple[str, ...] = (),
        jitter_px: int = 2,
        pad_px: int = 4,
        cutout_px: int = 16,
        pad_mode: str = "zeros",
        classes_per_batch: int = 0,
        classes_per_batch_until_epoch: int = 0,
        num_classes: int = 10,
    ) -> None:
        _validate(split, batch_size, mean, std, augment, train, classes_per_batch, num_classes)
        for key, value in (("jitter_px", jitter_px), ("pad_px", pad_px), ("cutout_px", cutout_px)):
            if value < 0:
                raise ValueError(f"{key} = {value} is invalid; accepted: an integer >= 0")
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode = {pad_mode!r} is invalid; accepted: zeros, reflect")
        self._split = split
        self._labels = split.y.cpu()  # the orders are drawn on CPU wherever the split lives
        self._batch_size = batch_size
        self._seed = seed
        self._train = train
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # [1, C, 1, 1]
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._augment = tuple(augment)
        self._px = {"jitter_px": jitter_px, "pad_px": pad_px, "cutout_px": cutout_px,
                    "pad_mode": pad_mode}
        self._classes_per_batch = classes_per_batch
        self._until_epoch = classes_per_batch_until_epoch
        self._num_classes = num_classes
        self._255 = torch.tensor(255.0)  # 0-dim, on the split's device (see the module doc)
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()
        self._orders_lock = threading.Lock()

    @property
    def num_samples(self) -> int:
        return len(self._split)

    @property
    def device(self) -> torch.device:
        """Where the split is held and batches are built."""
        return self._split.x.device

    def to(self, device: torch.device | str) -> BatchLoader:
        """The same loader with its split (uint8 stays uint8) on ``device``; self if already there.

        Batches are then built on ``device``; they are the same batches (see the module doc).
        """
        device = torch.device(device)
        if device == self.device:
            return self
        moved = BatchLoader.__new__(BatchLoader)
        moved.__dict__.update(self.__dict__)
        moved._split = dataclasses.replace(
            self._split, x=self._split.x.to(device), y=self._split.y.to(device)
        )
        moved._mean, moved._std, moved._255 = (
            t.to(device) for t in (self._mean, self._std, self._255)
        )
        moved._orders, moved._orders_lock = OrderedDict(), threading.Lock()
        return moved

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def class_limited(self, epoch: int) -> bool:
        """Whether the batches of ``epoch`` hold at most ``classes_per_batch`` classes."""
        return (
            self._train
            and self._classes_per_batch > 0
            and (self._until_epoch == 0 or epoch < self._until_epoch)
        )

    def num_batches(self, epoch: int) -> int:
        return len(self._order(epoch))

    def batch_indices(self, epoch: int, index: int) -> torch.Tensor:
        """The split indices (int64 [B]) that make up batch ``index`` of ``epoch``."""
        order = self._order(epoch)
        if not 0 <= index < len(order):
            raise IndexError(
                f"batch {index} of epoch {epoch} does not exist; this epoch has {len(order)} "
                f"batches (0 .. {len(order) - 1}) of up to {self._batch_size} samples"
            )
        return order[index]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: x float32 [B, C, H, W] normalised, y int64 [B]."""
        idx = self.batch_indices(epoch, index).to(self.device)
        x = self._split.x[idx]  # gather copies: the stored split is never modified
        x = x.to(torch.float32).div_(self._255) if x.dtype == torch.uint8 else x.float()
        if self._train and self._augment:
            gen = _generator("augment", self._seed, epoch, index)
            x = apply_augmentations(x, self._augment, gen, **self._px)
        x = x.sub_(self._mean).div_(self._std)
        return x, self._split.y[idx]

    def __call__(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start`` .. last of ``epoch`` (``start`` > 0 resumes mid-epoch)."""
        for index in range(start, self.num_batches(epoch)):
            yield self.batch(epoch, index)

    def _order(self, epoch: int) -> EpochOrder:
        if epoch < 0:
            raise ValueError(f"epoch = {epoch} is invalid; epochs count from 0")
        with self._orders_lock:
            if epoch not in self._orders:
                self._orders[epoch] = self._make_order(epoch)
                while len(self._orders) > _CACHED_EPOCHS:
                    self._orders.popitem(last=False)
            return self._orders[epoch]

    def _make_order(self, epoch: int) -> EpochOrder:
        n = self.num_samples
        if not self._train:
            return sequential_order(n, self._batch_size)
        gen = _generator("order", self._seed, epoch)
        if self.class_limited(epoch):
            return class_limited_order(
                self._labels,
                num_classes=self._num_classes,
                classes_per_batch=self._classes_per_batch,
                batch_size=self._batch_size,
                generator=gen,
            )
        return shuffled_order(n, self._batch_size, gen)


def _validate(
    split: Split,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: tuple[str, ...],
    train: bool,
    classes_per_batch: int,
    num_classes: int,
) -> None:
    channels = split.x.shape[1]
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} is invalid; accepted: an integer >= 1")
    if len(mean) != channels or len(std) != channels or min(std, default=1.0) <= 0:
        raise ValueError(
            f"mean {tuple(mean)} and std {tuple(std)} need one value per image channel "
            f"({channels}) and std > 0; pass the dataset's Dataset.mean / Dataset.std"
        )
    unknown = sorted(set(augment) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; accepted: {', '.join(AUGMENTATIONS)}")
    if not train and (augment or classes_per_batch):
        raise ValueError(
            f"an eval loader (train=False) takes no augment ({augment}) and no "
            f"classes_per_batch ({classes_per_batch}); pass them to the training loader only"
        )
    if classes_per_batch < 0:
        raise ValueError(f"classes_per_batch = {classes_per_batch}; accepted: an integer >= 0")
    if len(split) and not 0 <= int(split.y.min()) <= int(split.y.max()) < num_classes:
        raise ValueError(
            f"labels span {int(split.y.min())} .. {int(split.y.max())} but num_classes = "
            f"{num_classes}; pass the dataset's Dataset.num_classes"
        )


def make_loaders(ds: Dataset, cfg: DataConfig, seed: int) -> tuple[BatchLoader, BatchLoader]:
    """(training loader: shuffled, augmented, class-limited as configured; test loader)."""
    train = BatchLoader(
        ds.train,
        batch_size=cfg.batch_size,
        seed=seed,
        train=True,
        mean=ds.mean,
        std=ds.std,
        augment=cfg.augment,
        jitter_px=cfg.jitter_px,
        pad_px=cfg.pad_px,
        cutout_px=cfg.cutout_px,
        pad_mode=cfg.pad_mode,
        classes_per_batch=cfg.classes_per_batch,
        classes_per_batch_until_epoch=cfg.classes_per_batch_until_epoch,
        num_classes=ds.num_classes,
    )
    test = BatchLoader(
        ds.test,
        batch_size=cfg.eval_batch_size,
        seed=seed,
        train=False,
        mean=ds.mean,
        std=ds.std,
        num_classes=ds.num_classes,
    )
    return train, test
