"""Datasets that need no download: ``digits`` (bundled with scikit-learn), ``mnist-10k`` and
``synthetic-cifar`` (generated).

The first two ship a single pool of images, so they are split here with a fixed permutation
(``torch.Generator().manual_seed(0)``) that does not depend on the run seed: every run of every
experiment sees the same train and test images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelocal.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from pipelocal.data.registry import (
    DATASET_STATS,
    Dataset,
    DatasetError,
    Split,
    register_dataset,
)

if TYPE_CHECKING:
    from pipelocal.config import DataConfig

__all__ = [
    "DIGITS_TRAIN",
    "MNIST_10K_FILES",
    "MNIST_10K_TRAIN",
    "SYNTHETIC_CIFAR_SIZES",
    "digits_file",
    "fixed_split",
]

DIGITS_TRAIN = 1437
"""digits: the first 1437 of the 1797 permuted images train, the last 360 test."""
MNIST_10K_TRAIN = 8000
"""mnist-10k: the first 8000 of the 10000 permuted images train, the last 2000 test (4/5 of a
file of another size)."""
MNIST_10K_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
SYNTHETIC_CIFAR_SIZES = (10_000, 2_000)
"""synthetic-cifar: training and test images."""
# Uniform integers 0..255 scaled to [0, 1]: mean 1/2, std sqrt((256**2 - 1) / 12) / 255.
_UNIFORM_MEAN, _UNIFORM_STD = 0.5, ((256**2 - 1) / 12) ** 0.5 / 255
DATASET_STATS["mnist-10k"] = (_MNIST_MEAN, _MNIST_STD)
DATASET_STATS["synthetic-cifar"] = ((_UNIFORM_MEAN,) * 3, (_UNIFORM_STD,) * 3)


def fixed_split(x: torch.Tensor, y: torch.Tensor, n_train: int) -> tuple[Split, Split]:
    """Permute with a generator seeded 0 and cut after ``n_train`` samples."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:])


def digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz`` (1797 rows of 64 pixels 0..16 and the label),
    found without importing scikit-learn (seconds of start-up in every process that loads it)."""
    spec = importlib.util.find_spec("sklearn")
    path = (Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
            if spec is not None and spec.origin else None)
    if path is None or not path.is_file():
        raise DatasetError("dataset 'digits' is the copy bundled with scikit-learn, which is not "
                           "installed here (or lacks datasets/data/digits.csv.gz): pip install "
                           "scikit-learn, or use another data.name")
    return path


@register_dataset("digits")
def _digits(cfg: DataConfig) -> Dataset:
    import numpy as np

    # What sklearn.datasets.load_digits reads, read the same way: float64 pixels, int labels.
    table = np.loadtxt(digits_file(), delimiter=",")
    images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    x = torch.as_tensor(images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [N,1,8,8]
    y = torch.as_tensor(target, dtype=torch.int64)
    train, test = fixed_split(x, y, DIGITS_TRAIN)
    return Dataset(
        name="digits",
        train=train,
        test=test,
        num_classes=10,
        in_shape=(1, 8, 8),
        mean=(train.x.mean().item(),),
        std=(train.x.std().item(),),
    )


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


@register_dataset("mnist-10k")
def _mnist_10k(cfg: DataConfig) -> Dataset:
    root = Path(cfg.data_dir).expanduser().resolve()
    folders = [root, root / "mnist-10k"]  # data_dir may be the folder itself or its parent
    found = [_find_idx(folders, stem) for stem in MNIST_10K_FILES]
    missing = [stem + ".gz" for stem, path in zip(MNIST_10K_FILES, found) if path is None]
    if missing:
        raise DatasetError(
            f"dataset 'mnist-10k': missing {', '.join(missing)} (gzip or plain) in "
            f"{' or '.join(str(f) for f in folders)}; copy the MNIST test split (t10k IDX files) "
            f"there or point data.data_dir at the folder that holds them "
            "(pipelocal train --set data.data_dir=../shared/data/mnist-10k)"
        )
    images_path, labels_path = found
    assert images_path is not None and labels_path is not None
    x = read_idx(images_path, IMAGES_MAGIC).unsqueeze(1)  # [N,1,28,28] uint8
    y = read_idx(labels_path, LABELS_MAGIC).long()
    if len(x) != len(y):
        raise DatasetError(
            f"dataset 'mnist-10k': {images_path} holds {len(x)} images but {labels_path} "
            f"holds {len(y)} labels; replace the files with a matching pair"
        )
    train, test = fixed_split(x, y, MNIST_10K_TRAIN if len(y) == 10_000 else len(y) * 4 // 5)
    return Dataset(
        name="mnist-10k",
        train=train,
        test=test,
        num_classes=10,
        in_shape=(1, 28, 28),
        mean=_MNIST_MEAN,
        std=_MNIST_STD,
    )


@register_dataset("synthetic-cifar")
def _synthetic_cifar(cfg: DataConfig) -> Dataset:
    """Uniform random uint8 images of CIFAR-10's shape [3, 32, 32] with random labels 0..9.

    Nothing to learn: it exists so that speed and data-loading benchmarks run on CIFAR-sized
    batches without a download. Generated from a generator seeded 0, so always the same.
    """
    n_train, n_test = SYNTHETIC_CIFAR_SIZES
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return Dataset(
        name="synthetic-cifar",
        train=Split(x[:n_train], y[:n_train]),
        test=Split(x[n_train:], y[n_train:]),
        num_classes=10,
        in_shape=(3, 32, 32),
        mean=(_UNIFORM_MEAN,) * 3,
        std=(_UNIFORM_STD,) * 3,
    )
