"""Data: the dataset registry, in-memory datasets and deterministic batch loaders.

``load_dataset(cfg.data)`` reads a registered dataset into memory; ``make_loaders`` wraps its
splits in :class:`BatchLoader` s whose ``batch(epoch, index)`` is a pure function of the run
seed, so every process of a pipelined run can rebuild exactly the same batches;
:mod:`pipelocal.data.prefetch` iterates an epoch of them, built ahead by one thread.
"""

from __future__ import annotations

# Importing the modules that hold @register_dataset fills the registry.
from pipelocal.data import embedded as _embedded  # noqa: F401
from pipelocal.data import torchvision_sets as _torchvision_sets  # noqa: F401
from pipelocal.data.loader import BatchLoader, make_loaders
from pipelocal.data.registry import (
    DATASET_STATS,
    DATASETS,
    Dataset,
    DatasetError,
    Split,
    UnknownDatasetError,
    dataset_stats,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "BatchLoader",
    "Dataset",
    "DatasetError",
    "Split",
    "UnknownDatasetError",
    "dataset_stats",
    "load_dataset",
    "make_loaders",
    "register_dataset",
]
