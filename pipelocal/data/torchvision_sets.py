"""The standard image sets, read through torchvision and held in memory as uint8 tensors.

torchvision only says "Dataset not found" when a file is missing, so before calling it (when
``data.download`` is false) the exact files it opens are checked here and a missing one is
reported with its name, the full folder and how to get it. The file lists are read from the
torchvision classes themselves (``resources``, ``train_list``, ``split_list``), so they follow
the installed version.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelocal.data.registry import (
    DATASET_STATS,
    Dataset,
    DatasetError,
    Split,
    register_dataset,
)

if TYPE_CHECKING:
    from pipelocal.config import DataConfig

__all__ = ["required_files"]

# Per-channel statistics of the training images in [0, 1] (the commonly published values).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "svhn-extra": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
DATASET_STATS.update(_STATS)
_MNIST_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
_CIFAR_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_SVHN_SPLITS = {"svhn": ("train",), "svhn-extra": ("train", "extra")}
"""The SVHN splits each name trains on (it always tests on 'test')."""


def required_files(name: str, root: str | Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads dataset ``name`` from below ``root`` and the files it needs."""
    import torchvision.datasets as tvd

    root = Path(root).expanduser().resolve()
    if name in _MNIST_CLASSES:
        cls: Any = getattr(tvd, _MNIST_CLASSES[name])
        processed = root / cls.__name__ / "processed"
        if all((processed / f).is_file() for f in (cls.training_file, cls.test_file)):
            return processed, [cls.training_file, cls.test_file]  # torchvision's legacy cache
        # torchvision stores them decompressed: <root>/<Class>/raw/<url name without .gz>
        names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
        return root / cls.__name__ / "raw", names
    if name in _CIFAR_CLASSES:
        cls = getattr(tvd, _CIFAR_CLASSES[name])
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root / cls.base_folder, names
    if name in _SVHN_SPLITS:
        return root, [tvd.SVHN.split_list[s][1] for s in (*_SVHN_SPLITS[name], "test")]
    if name == "stl10":  # torchvision checks every file, the unlabeled one included
        names = [f for f, _ in tvd.STL10.train_list + tvd.STL10.test_list]
        return root / tvd.STL10.base_folder, names
    raise KeyError(f"{name!r} is not a torchvision dataset; known: {', '.join(_STATS)}")


def _fix_hint(folder: Path) -> str:
    return (
        "set data.download = true on a machine with internet "
        f"(pipelocal train --set data.download=true), or copy the files into {folder}"
    )


def _check_files(name: str, cfg: DataConfig) -> Path:
    folder, names = required_files(name, cfg.data_dir)
    missing = [f for f in names if not (folder / f).is_file()]
    if missing and not cfg.download:
        kind = " (uncompressed IDX: gunzip the .gz files)" if name in _MNIST_CLASSES else ""
        raise DatasetError(
            f"dataset {name!r}: missing {', '.join(missing)}{kind} in {folder}; {_fix_hint(folder)}"
        )
    return folder


def _open(name: str, cfg: DataConfig, make: Callable[..., Any], **kwargs: Any) -> Any:
    """Call the torchvision constructor, turning its not-found error into a DatasetError."""
    folder = _check_files(name, cfg)
    try:
        return make(root=str(Path(cfg.data_dir).expanduser()), download=cfg.download, **kwargs)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise DatasetError(
            f"dataset {name!r}: torchvision could not use the files in {folder} ({exc}); they "
            f"may be incomplete or corrupted (checksum mismatch): delete them, then "
            f"{_fix_hint(folder)}"
        ) from exc


def _split(data: Any, labels: Any, layout: str) -> Split:
    """uint8 [N, C, H, W] and int64 [N] from torchvision's arrays (one copy, no PIL)."""
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if layout == "NHW":
        x = x.unsqueeze(1)
    elif layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return Split(x.contiguous(), y)


def _dataset(name: str, train: Split, test: Split, num_classes: int) -> Dataset:
    mean, std = _STATS[name]
    c, h, w = (int(d) for d in train.x.shape[1:])
    return Dataset(name, train, test, num_classes, (c, h, w), mean, std)


def _mnist_family(name: str, cfg: DataConfig) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _MNIST_CLASSES[name])
    splits = [_open(name, cfg, cls, train=t) for t in (True, False)]
    train, test = (_split(s.data, s.targets, "NHW") for s in splits)
    return _dataset(name, train, test, 10)


def _cifar(name: str, cfg: DataConfig) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _CIFAR_CLASSES[name])
    splits = [_open(name, cfg, cls, train=t) for t in (True, False)]
    train, test = (_split(s.data, s.targets, "NHWC") for s in splits)
    return _dataset(name, train, test, len(splits[0].classes))


@register_dataset("mnist")
def _mnist(cfg: DataConfig) -> Dataset:
    return _mnist_family("mnist", cfg)


@register_dataset("fashion-mnist")
def _fashion_mnist(cfg: DataConfig) -> Dataset:
    return _mnist_family("fashion-mnist", cfg)


@register_dataset("kmnist")
def _kmnist(cfg: DataConfig) -> Dataset:
    return _mnist_family("kmnist", cfg)


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig) -> Dataset:
    return _cifar("cifar10", cfg)


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig) -> Dataset:
    return _cifar("cifar100", cfg)


def _svhn(name: str, cfg: DataConfig, train_splits: tuple[str, ...]) -> Dataset:
    import torchvision.datasets as tvd

    parts = {s: _open(name, cfg, tvd.SVHN, split=s) for s in (*train_splits, "test")}
    train = _split(
        np.concatenate([parts[s].data for s in train_splits]),
        np.concatenate([parts[s].labels for s in train_splits]),
        "NCHW",
    )
    test = _split(parts["test"].data, parts["test"].labels, "NCHW")
    return _dataset(name, train, test, 10)


@register_dataset("svhn")
def _svhn_train(cfg: DataConfig) -> Dataset:
    """The 73,257 images of split 'train' (the AugLocal and InfoPro authors' protocol)."""
    return _svhn("svhn", cfg, ("train",))


@register_dataset("svhn-extra")
def _svhn_extra(cfg: DataConfig) -> Dataset:
    """'train' + 'extra': 604,388 images (Nøkland & Eidnes's protocol)."""
    return _svhn("svhn-extra", cfg, ("train", "extra"))


@register_dataset("stl10")
def _stl10(cfg: DataConfig) -> Dataset:
    import torchvision.datasets as tvd

    train, test = (
        _split(s.data, s.labels, "NCHW")
        for s in (_open("stl10", cfg, tvd.STL10, split=p) for p in ("train", "test"))
    )
    return _dataset("stl10", train, test, 10)
