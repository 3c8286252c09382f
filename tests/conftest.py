"""Shared helpers: tiny configs that run in seconds on CPU, and checkpoint comparison."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelocal.checkpoint import block_file, read_manifest, resolve_checkpoint
from pipelocal.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MNIST_10K = REPO.parent / "shared" / "data" / "mnist-10k"


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """A 4-block conv net (conv-BN-ReLU-dropout-pool, fc, output) on 300 digits, batch 64.

    300 = 4 x 64 + 44, so every epoch ends with a smaller batch. One thread everywhere: CPU
    results depend on the thread count, and exactness needs reference and stages alike.
    """
    return load_config(None, tiny_overrides(tmp_path) + list(overrides))


def tiny_overrides(tmp_path: Path) -> list[str]:
    """The ``--set`` values of :func:`tiny_config`, for runs started from the command line."""
    return [
        "model.name=cnn", "model.width=0.25", "model.fc_width=32", "model.dropout=0.1",
        "data.train_limit=300", "data.batch_size=64", "data.eval_batch_size=100",
        "rule.name=predsim", "run.epochs=2", f"run.out_dir={tmp_path}", "run.progress=false",
        "run.threads=1", "pipeline.threads_per_stage=1", "pipeline.timeout_s=60",
    ]


def checkpoint_tensors(path: str | Path) -> dict[str, Any]:
    """Every block's saved state (parameters, buffers, optimiser, generator) of a checkpoint."""
    ckpt = resolve_checkpoint(path)
    n = read_manifest(ckpt)["num_blocks"]
    return {i: torch.load(block_file(ckpt, i), weights_only=False) for i in range(n)}


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Recursive bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {a.keys()} vs {b.keys()}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"values differ at {where}: {a!r} vs {b!r}"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread per process: exactness needs the same count in reference and stages,
    and on a busy 2-core machine more threads mostly spin-wait (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
