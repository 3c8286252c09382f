"""Tests for pipelocal.data: registry, loaders, determinism, augmentations, class sampler
(prefetching is in ``tests/test_prefetch.py``).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelocal.config import ConfigError, DataConfig
from pipelocal.data import (
    DATASETS,
    BatchLoader,
    Dataset,
    DatasetError,
    Split,
    UnknownDatasetError,
    load_dataset,
    make_loaders,
)
from pipelocal.data.augment import cutout, random_flip, random_translate
from pipelocal.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, write_idx

REPO = Path(__file__).resolve().parents[1]
MNIST_10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-10k"
MNIST_10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# One file torchvision needs per dataset and the folder it is looked for in (relative to
# data_dir). A newly registered dataset fails test_missing_files_error until it is added here.
EXPECTED_MISSING = {
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte"),
    "fashion-mnist": ("FashionMNIST/raw", "train-images-idx3-ubyte"),
    "kmnist": ("KMNIST/raw", "train-images-idx3-ubyte"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1"),
    "cifar100": ("cifar-100-python", "train"),
    "svhn": (".", "train_32x32.mat"),
    "svhn-extra": (".", "extra_32x32.mat"),
    "stl10": ("stl10_binary", "train_X.bin"),
    "mnist-10k": (".", "t10k-images-idx3-ubyte.gz"),
}
EMBEDDED = {"digits", "synthetic-cifar"}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


def _synthetic(n: int = 64, c: int = 1, h: int = 12, w: int = 12) -> Split:
    """Images with every pixel >= 1, so a zero in the output can only come from a fill."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    return Split(x, torch.arange(n) % 10)


def _raw_loader(split: Split, **kwargs: object) -> BatchLoader:
    """A training loader with identity normalisation, so batches are the [0, 1] images."""
    channels = split.x.shape[1]
    return BatchLoader(
        split,
        batch_size=len(split),
        seed=7,
        train=True,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        **kwargs,  # type: ignore[arg-type]
    )


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x [C, H, W] with its content moved down dy and right dx, zero fill."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _shifts_found(before: torch.Tensor, after: torch.Tensor, px: int) -> list[tuple[int, int]]:
    """For each sample, the (dy, dx) with |dy|, |dx| <= px that maps before to after exactly."""
    found = []
    for b, a in zip(before, after):
        matches = [
            (dy, dx)
            for dy in range(-px, px + 1)
            for dx in range(-px, px + 1)
            if torch.equal(_shift(b, dy, dx), a)
        ]
        assert matches, "an output image is not a translation of its input by <= px"
        found.append(matches[0])
    return found


# --------------------------------------------------------------------------- registry


def test_registry_lists_all_eleven_names() -> None:
    assert DATASETS.names() == [
        "cifar10",
        "cifar100",
        "digits",
        "fashion-mnist",
        "kmnist",
        "mnist",
        "mnist-10k",
        "stl10",
        "svhn",
        "svhn-extra",
        "synthetic-cifar",
    ]


def test_unknown_name_lists_available() -> None:
    cfg = types.SimpleNamespace(name="imagenet", data_dir=".", download=False, train_limit=0)
    with pytest.raises(UnknownDatasetError, match="available: cifar10, cifar100, digits"):
        load_dataset(cfg)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- datasets


def test_digits_loads_offline_with_fixed_split(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("digits must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ds = load_dataset(DataConfig(name="digits"))
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert ds.train.x.shape == (1437, 1, 8, 8) and ds.train.x.dtype == torch.float32
    assert ds.test.y.dtype == torch.int64 and ds.num_classes == 10 and ds.in_shape == (1, 8, 8)
    assert 0.0 == ds.train.x.min() and ds.train.x.max() == 1.0
    assert set(ds.train.y.tolist()) == set(range(10)) == set(ds.test.y.tolist())
    assert ds.mean == pytest.approx((ds.train.x.mean().item(),))
    assert ds.std == pytest.approx((ds.train.x.std().item(),))
    again = load_dataset(DataConfig(name="digits", data_dir="/nonexistent"))
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)


def test_digits_are_sklearns_without_importing_it() -> None:
    """The file read directly gives exactly scikit-learn's load_digits(), and loading it
    imports no scikit-learn (checked in a fresh interpreter)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    ds, bunch = load_dataset(DataConfig(name="digits")), load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ds.train.x, x[perm][:1437]) and torch.equal(ds.test.x, x[perm][1437:])
    assert torch.equal(ds.test.y, torch.as_tensor(bunch.target)[perm][1437:])
    probe = ("import sys; from pipelocal.data import load_dataset; "
             "from pipelocal.config import DataConfig; load_dataset(DataConfig(name='digits')); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_synthetic_cifar_is_cifar_shaped_and_fixed() -> None:
    ds = load_dataset(DataConfig(name="synthetic-cifar", data_dir="/nonexistent"))
    assert (len(ds.train), len(ds.test), ds.in_shape) == (10_000, 2_000, (3, 32, 32))
    assert ds.train.x.dtype == torch.uint8 and ds.num_classes == 10
    observed = ds.train.x.float().div(255)
    assert observed.mean().item() == pytest.approx(ds.mean[0], abs=1e-3)
    assert observed.std().item() == pytest.approx(ds.std[0], abs=1e-3)
    again = load_dataset(DataConfig(name="synthetic-cifar"))
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)


def test_train_limit_keeps_first_samples(digits: Dataset) -> None:
    small = load_dataset(DataConfig(train_limit=100))
    assert torch.equal(small.train.x, digits.train.x[:100]) and len(small.test) == 360


@pytest.mark.parametrize("name", sorted(set(DATASETS.names()) - EMBEDDED))
def test_missing_files_error(name: str, tmp_path: Path) -> None:
    subdir, filename = EXPECTED_MISSING[name]
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
    message = str(info.value)
    assert filename in message and name in message
    assert str((tmp_path / subdir).resolve()) in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(("name", "splits", "n_train"), [
    ("svhn", ["train", "test"], 3), ("svhn-extra", ["train", "extra", "test"], 8)])
def test_svhn_trains_on_split_train_and_svhn_extra_adds_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, splits: list[str], n_train: int
) -> None:
    """ChenxiangMA/AugLocal ``train.py`` line 125: ``{'split': 'train'}`` (73,257 images), as
    the AugLocal paper (app. A.1); ``svhn-extra`` adds split 'extra' (Nøkland & Eidnes)."""
    import torchvision.datasets as tvd

    sizes = {"train": 3, "extra": 5, "test": 2}
    opened: list[str] = []

    class FakeSVHN:
        split_list = tvd.SVHN.split_list

        def __init__(self, root: str, split: str, download: bool) -> None:
            opened.append(split)
            n = sizes[split]
            self.data = np.full((n, 3, 32, 32), len(opened), dtype=np.uint8)
            self.labels = np.arange(n) % 10

    for f in tvd.SVHN.split_list.values():
        (tmp_path / f[1]).write_bytes(b"")
    monkeypatch.setattr(tvd, "SVHN", FakeSVHN)
    ds = load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
    assert opened == splits
    assert len(ds.train) == n_train and len(ds.test) == 2 and ds.name == name


def test_missing_files_error_tells_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data\.download = true"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))


def test_corrupted_files_are_wrapped(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"")  # present, but torchvision's checksum fails
    with pytest.raises(DatasetError, match="corrupted") as info:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    assert str(folder.resolve()) in str(info.value)


@pytest.mark.parametrize(
    "name,cls", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")]
)
def test_mnist_family_loads_through_torchvision_offline(
    name: str, cls: str, tmp_path: Path
) -> None:
    raw = tmp_path / cls / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    written = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=gen)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = (images, labels)
    ds = load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    assert torch.equal(ds.train.x[:, 0], written["train"][0])
    assert torch.equal(ds.test.y, written["t10k"][1].long())
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10 and len(ds.mean) == 1


def test_idx_roundtrip_and_bad_magic(tmp_path: Path) -> None:
    values = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, values)
        assert torch.equal(read_idx(tmp_path / name, IMAGES_MAGIC), values)
    with pytest.raises(ValueError, match="magic 2051, expected 2049"):
        read_idx(tmp_path / "a-idx3-ubyte", LABELS_MAGIC)


def test_mnist_10k_reads_gzip_from_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "mnist-10k"  # data_dir may be the parent of the folder
    folder.mkdir()
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (torch.arange(50) % 10).to(torch.uint8))
    ds = load_dataset(DataConfig(name="mnist-10k", data_dir=str(tmp_path)))
    assert (len(ds.train), len(ds.test)) == (40, 10)  # 4/5 of a file that is not 10,000
    pooled = torch.cat([ds.train.x, ds.test.x])[:, 0]
    assert sorted(map(bytes, pooled.numpy())) == sorted(map(bytes, images.numpy()))


def test_mnist_10k_real_split() -> None:
    if not MNIST_10K.is_dir():
        pytest.skip(f"real MNIST test split not found at {MNIST_10K} (only on project machines)")
    ds = load_dataset(DataConfig(name="mnist-10k", data_dir=str(MNIST_10K)))
    assert (len(ds.train), len(ds.test)) == (8000, 2000)
    assert ds.train.x.shape == (8000, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    counts = torch.bincount(torch.cat([ds.train.y, ds.test.y]), minlength=10)
    assert counts.tolist() == MNIST_10K_COUNTS
    assert abs(ds.train.x.float().mean().item() / 255 - ds.mean[0]) < 0.01


# --------------------------------------------------------------------------- loader


def test_batches_are_pure_functions_of_seed_epoch_index(digits: Dataset) -> None:
    cfg = DataConfig(augment=("jitter", "flip", "cutout"), cutout_px=4)
    a, _ = make_loaders(digits, cfg, seed=3)
    b, _ = make_loaders(digits, cfg, seed=3)
    forward = [a.batch(1, i) for i in range(a.num_batches(1))]
    for i in reversed(range(b.num_batches(1))):  # other order, other loader, other epochs first
        b.batch(4, i % b.num_batches(4))
        xb, yb = b.batch(1, i)
        assert torch.equal(xb, forward[i][0]) and torch.equal(yb, forward[i][1])
    assert torch.equal(a.batch(1, 2)[0], forward[2][0])  # calling again changes nothing
    assert not torch.equal(a.batch(2, 0)[1], forward[0][1])  # another epoch, another order
    c, _ = make_loaders(digits, cfg, seed=4)
    assert not torch.equal(c.batch(1, 0)[1], forward[0][1])  # another seed, another order
    resumed = list(a(1, start=3))
    assert len(resumed) == len(forward) - 3 and torch.equal(resumed[0][0], forward[3][0])


def test_batches_independent_of_thread_count_and_process(digits: Dataset, tmp_path: Path) -> None:
    cfg = DataConfig(augment=("padcrop", "flip", "cutout"), cutout_px=3, classes_per_batch=3)
    loader, _ = make_loaders(digits, cfg, seed=11)
    here = loader.batch(2, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fresh, _ = make_loaders(digits, cfg, seed=11)
        assert torch.equal(fresh.batch(2, 5)[0], here[0])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "batch.pt"
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(2)\n"
        "from pipelocal.config import DataConfig\n"
        "from pipelocal.data import load_dataset, make_loaders\n"
        "cfg = DataConfig(augment=('padcrop', 'flip', 'cutout'), cutout_px=3,"
        " classes_per_batch=3)\n"
        "loader, _ = make_loaders(load_dataset(cfg), cfg, seed=11)\n"
        "torch.save(loader.batch(2, 5), sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, timeout=180)
    there = torch.load(out)
    assert torch.equal(there[0], here[0]) and torch.equal(there[1], here[1])


def test_epoch_covers_every_sample_once_and_last_batch_is_smaller(digits: Dataset) -> None:
    loader, _ = make_loaders(digits, DataConfig(batch_size=128), seed=0)
    assert loader.num_samples == 1437 and loader.num_batches(0) == 12
    sizes = [len(loader.batch_indices(0, i)) for i in range(12)]
    assert sizes == [128] * 11 + [1437 - 11 * 128]
    seen = torch.cat([loader.batch_indices(0, i) for i in range(12)])
    assert torch.equal(seen.sort().values, torch.arange(1437))
    assert not torch.equal(seen, torch.arange(1437))  # shuffled
    x, y = loader.batch(0, 11)
    assert x.shape == (29, 1, 8, 8) and y.shape == (29,) and x.dtype == torch.float32
    with pytest.raises(IndexError, match="has 12 batches"):
        loader.batch(0, 12)


def test_eval_loader_is_fixed_and_normalised(digits: Dataset) -> None:
    cfg = DataConfig(eval_batch_size=100, augment=("flip", "cutout"))
    _, test = make_loaders(digits, cfg, seed=0)
    assert test.num_batches(0) == 4 and test.batch_size == 100
    x = torch.cat([xb for xb, _ in test(0)])
    y = torch.cat([yb for _, yb in test(5)])
    expected = (digits.test.x - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x, expected, atol=1e-6) and torch.equal(y, digits.test.y)
    assert abs(x.mean().item()) < 0.1  # normalised with the training split's statistics


def test_uint8_images_are_scaled_to_unit_range() -> None:
    split = _synthetic(n=8)
    loader = BatchLoader(split, batch_size=8, seed=0, train=False, mean=(0.5,), std=(0.25,))
    x, _ = loader.batch(0, 0)
    assert torch.allclose(x, (split.x.float() / 255 - 0.5) / 0.25)


def test_loader_rejects_bad_settings(digits: Dataset) -> None:
    make = functools.partial(BatchLoader, digits.test, batch_size=8, seed=0, std=(0.4,))
    with pytest.raises(ValueError, match="eval loader"):
        make(train=False, mean=(0.3,), augment=("flip",))
    with pytest.raises(ValueError, match="one value per image channel"):
        make(train=True, mean=(0.3, 0.3))
    with pytest.raises(ValueError, match="accepted: jitter, flip, padcrop, cutout"):
        make(train=True, mean=(0.3,), augment=("rotate",))
    with pytest.raises(ValueError, match="num_classes = 5"):
        make(train=True, mean=(0.3,), num_classes=5)


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("aug,key,px", [("jitter", "jitter_px", 2), ("padcrop", "pad_px", 3)])
def test_translation_moves_content_by_at_most_px(aug: str, key: str, px: int) -> None:
    split = _synthetic()
    x, _ = _raw_loader(split, augment=(aug,), **{key: px}).batch(0, 0)
    before = split.x[_raw_loader(split).batch_indices(0, 0)].float() / 255
    shifts = _shifts_found(before, x, px)
    assert any(s != (0, 0) for s in shifts) and len(set(shifts)) > 3


# The 4x4 image 0..15 reflect-padded by 1 px, by hand: row -1 mirrors row 1, column -1
# mirrors column 1 (the edge pixel is not repeated), and likewise at the far sides.
_REFLECT_PAD1 = [
    [5, 4, 5, 6, 7, 6],
    [1, 0, 1, 2, 3, 2],
    [5, 4, 5, 6, 7, 6],
    [9, 8, 9, 10, 11, 10],
    [13, 12, 13, 14, 15, 14],
    [9, 8, 9, 10, 11, 10],
]


def test_padcrop_reflect_is_the_auglocal_authors_cifar_padding() -> None:
    """ChenxiangMA/AugLocal ``train.py`` lines 129-136: ``F.pad(x, (4, 4, 4, 4),
    mode='reflect')``, then ``RandomCrop(32)``: every output is one crop of the reflect-padded
    image (here 1 px on a 4x4 image, padded by hand above)."""
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = random_translate(x, 1, torch.Generator().manual_seed(0), "reflect")
    padded = torch.tensor(_REFLECT_PAD1, dtype=torch.float32)
    crops = {(oy, ox): padded[oy:oy + 4, ox:ox + 4] for oy in range(3) for ox in range(3)}
    found = {next(k for k, c in crops.items() if torch.equal(o[0], c)) for o in out}
    assert len(found) >= 5  # 32 draws of 9 offsets
    zeros = random_translate(x, 1, torch.Generator().manual_seed(0))
    assert (zeros == 0).sum() > (x == 0).sum()  # the zero fill shows, the reflection does not
    assert (out == 0).sum() <= len(x)  # the padded image holds one 0 (its corner)
    with pytest.raises(ValueError, match="reflect padding by 4 px"):
        random_translate(x, 4, torch.Generator(), "reflect")


def test_pad_mode_reaches_the_training_batches() -> None:
    split = _synthetic(h=8, w=8)
    batches = {mode: _raw_loader(split, augment=("padcrop",), pad_px=2,
                                 pad_mode=mode).batch(0, 0)[0]
               for mode in ("zeros", "reflect")}
    assert (batches["zeros"] == 0).any() and not (batches["reflect"] == 0).any()
    with pytest.raises(ConfigError, match=r"data\.pad_mode"):
        DataConfig(pad_mode="edge")  # type: ignore[arg-type]


def test_random_translate_with_known_generator() -> None:
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 5, (1,), generator=gen), torch.randint(0, 5, (1,), generator=gen)
    assert out[0, 0, 4 + 2 - oy.item(), 4 + 2 - ox.item()] == 1.0 and out.sum() == 1.0


def test_flip_mirrors_exactly_the_flipped_samples() -> None:
    split = _synthetic()
    x, _ = _raw_loader(split, augment=("flip",)).batch(0, 0)
    before = split.x[_raw_loader(split).batch_indices(0, 0)].float() / 255
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(x, before)]
    kept = [torch.equal(a, b) for a, b in zip(x, before)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample exactly one of the two
    assert 10 < sum(flipped) < 54
    again = random_flip(before, torch.Generator().manual_seed(1))
    assert torch.equal(again, random_flip(before, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("px", [4, 5])
def test_cutout_zeroes_exactly_a_clipped_square(px: int) -> None:
    before = torch.rand(200, 3, 10, 10) + 0.1  # no zeros anywhere
    after = cutout(before, px, torch.Generator().manual_seed(0))
    clipped = 0
    for a, b in zip(after, before):
        zero = a == 0  # [C, H, W]
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        assert torch.equal(a[~zero], b[~zero])
        rows = zero[0].any(1).nonzero().flatten()
        cols = zero[0].any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert zero[0, r0:r1, c0:c1].all() and zero[0].sum() == (r1 - r0) * (c1 - c0)
        for lo, hi in ((r0, r1), (c0, c1)):
            assert hi - lo == px or (hi - lo < px and (lo == 0 or hi == 10))
        clipped += int((r1 - r0) < px or (c1 - c0) < px)
    assert 0 < clipped < 200  # both whole and border-clipped squares occur


def test_augmentations_only_change_training_batches(digits: Dataset) -> None:
    cfg = DataConfig(augment=("cutout",), cutout_px=4)
    plain, _ = make_loaders(digits, DataConfig(), seed=0)
    augmented, test = make_loaders(digits, cfg, seed=0)
    assert torch.equal(plain.batch_indices(0, 0), augmented.batch_indices(0, 0))
    assert not torch.equal(plain.batch(0, 0)[0], augmented.batch(0, 0)[0])
    _, plain_test = make_loaders(digits, DataConfig(), seed=0)
    assert torch.equal(test.batch(0, 0)[0], plain_test.batch(0, 0)[0])


# --------------------------------------------------------------------------- class-limited sampler


def test_class_limited_batches_until_cutoff(digits: Dataset) -> None:
    cfg = DataConfig(batch_size=64, classes_per_batch=2, classes_per_batch_until_epoch=2)
    limited, _ = make_loaders(digits, cfg, seed=5)
    plain, _ = make_loaders(digits, DataConfig(batch_size=64), seed=5)
    for epoch in (0, 1):
        assert limited.class_limited(epoch)
        batches = [limited.batch_indices(epoch, i) for i in range(limited.num_batches(epoch))]
        assert all(len(digits.train.y[b].unique()) <= 2 for b in batches)
        assert max(len(b) for b in batches) == 64
        seen = torch.cat(batches)
        assert torch.equal(seen.sort().values, torch.arange(1437))
        _, ys = zip(*limited(epoch))
        assert torch.equal(torch.cat(ys), digits.train.y[seen])
    assert not limited.class_limited(2)
    assert limited.num_batches(2) == plain.num_batches(2) == 23
    for i in range(23):
        assert torch.equal(limited.batch(2, i)[0], plain.batch(2, i)[0])


def test_class_limited_for_all_epochs_when_cutoff_is_zero(digits: Dataset) -> None:
    cfg = DataConfig(batch_size=100, classes_per_batch=3)
    loader, _ = make_loaders(digits, cfg, seed=1)
    n = loader.num_batches(7)
    batches = [loader.batch_indices(7, i) for i in range(n)]
    assert all(len(digits.train.y[b].unique()) <= 3 for b in batches)
    assert sum(len(b) for b in batches) == 1437 and n >= 15


# --------------------------------------------------------------------------- split on a device


def test_dividing_by_a_0dim_tensor_equals_dividing_by_the_scalar() -> None:
    """The loader divides by 255 as a 0-dim tensor (exact on CUDA too); on CPU this is the
    same as the Python scalar for every uint8 value, so CPU batches did not change."""
    x = torch.arange(256, dtype=torch.uint8).to(torch.float32)
    assert torch.equal(x.clone().div_(torch.tensor(255.0)), x.clone().div_(255.0))
