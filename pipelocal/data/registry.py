"""The dataset registry and the in-memory dataset types every loader returns.

A dataset is registered with ``@register_dataset("name")`` on a function that takes the
:class:`~pipelocal.config.DataConfig` and returns a :class:`Dataset` held fully in memory
(uint8 images, or float32 in [0, 1] for the embedded ``digits``). The CLI, the config
validation and the tests all enumerate ``DATASETS.names()``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipelocal.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from pipelocal.config import DataConfig

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "Dataset",
    "DatasetError",
    "Split",
    "UnknownDatasetError",
    "dataset_stats",
    "load_dataset",
    "register_dataset",
]

DatasetLoader = Callable[["DataConfig"], "Dataset"]


class DatasetError(FileNotFoundError):
    """Dataset files missing or unreadable; the message names them, the folder and the fix."""


@dataclass(frozen=True, slots=True)
class Split:
    """One split in memory: ``x`` [N, C, H, W] (uint8 0..255 or float32 in [0, 1]), ``y`` [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"a split needs x [N, C, H, W] and y [N] with the same N, got x "
                f"{list(self.x.shape)} and y {list(self.y.shape)}"
            )
        if self.x.dtype not in (torch.uint8, torch.float32) or self.y.dtype != torch.int64:
            raise ValueError(
                f"a split needs x uint8 or float32 and y int64, got x {self.x.dtype} and "
                f"y {self.y.dtype}; convert with .to(torch.uint8) / .long()"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, slots=True)
class Dataset:
    """A train and a test split with what a model and a loader need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    in_shape: tuple[int, int, int]
    """(C, H, W) of one image."""
    mean: tuple[float, ...]
    """Per-channel mean of the images scaled to [0, 1] (uint8 / 255)."""
    std: tuple[float, ...]
    """Per-channel standard deviation in the same units as ``mean``."""

    def __post_init__(self) -> None:
        for split_name, split in (("train", self.train), ("test", self.test)):
            if tuple(split.x.shape[1:]) != tuple(self.in_shape):
                raise ValueError(
                    f"dataset {self.name!r}: {split_name} images are "
                    f"{list(split.x.shape[1:])} but in_shape is {list(self.in_shape)}"
                )
        channels = self.in_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"dataset {self.name!r}: mean {self.mean} and std {self.std} need one value "
                f"per channel ({channels})"
            )


DATASETS: Registry[DatasetLoader] = Registry("dataset")
register_dataset = DATASETS.register
"""Decorator: register ``fn(cfg) -> Dataset`` under a name."""
UnknownDatasetError = UnknownNameError


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name`` into memory, keeping the first ``cfg.train_limit`` training samples."""
    ds = DATASETS.get(cfg.name)(cfg)
    if cfg.train_limit > 0:
        limited = Split(ds.train.x[: cfg.train_limit], ds.train.y[: cfg.train_limit])
        ds = dataclasses.replace(ds, train=limited)
    return ds


Stats = tuple[tuple[float, ...], tuple[float, ...]]
DATASET_STATS: dict[str, Stats] = {}
"""name -> (mean, std) of the datasets whose normalisation is fixed in advance, so that
:func:`dataset_stats` need not load them."""


def dataset_stats(cfg: DataConfig) -> Stats:
    """(mean, std) the loaders normalise ``cfg.name`` with, without loading it if it is known
    in advance (:data:`DATASET_STATS`); else from the loaded dataset, once per process."""
    if cfg.name in DATASET_STATS:
        return DATASET_STATS[cfg.name]
    return _loaded_stats(cfg.name, cfg.data_dir)


@functools.lru_cache(maxsize=8)
def _loaded_stats(name: str, data_dir: str) -> Stats:
    from pipelocal.config import DataConfig

    ds = DATASETS.get(name)(DataConfig(name=name, data_dir=data_dir))
    return tuple(ds.mean), tuple(ds.std)
