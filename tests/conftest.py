"""Shared helpers: tiny configs that run in seconds on CPU, checkpoint comparison, and one local
Ray instance for the whole session (tests marked ``ray`` use it; skipped when Ray is missing)."""

from __future__ import annotations

import importlib.util
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelocal.checkpoint import block_file, read_manifest, resolve_checkpoint
from pipelocal.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MNIST_10K = REPO.parent / "shared" / "data" / "mnist-10k"
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='needs Ray: pip install -e ".[ray]"')
RAY_CPUS = 4
"""Logical CPUs of the test Ray instance: room for 3 one-CPU stage actors and one spare."""


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


def run_two_ranks(target: Any, *args: Any) -> dict[int, Any]:
    """Run ``target(rank, port, *args, out)`` in two spawned processes; {rank: what it put}.

    ``port`` is a free port for the ranks' TCPStore; each rank puts one (rank, result) on
    ``out``. Every wait has a timeout, and both processes must exit 0.
    """
    import torch.distributed as dist

    from pipelocal.launch.spawn import worker_context

    probe = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    port = probe.port
    del probe  # frees the port for the workers' own store
    ctx = worker_context()  # the launcher's: one forkserver for the whole session
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def checkpoint_tensors(path: str | Path) -> dict[str, Any]:
    """Every block's saved state (parameters, buffers, optimiser, generator) of a checkpoint."""
    ckpt = resolve_checkpoint(path)
    n = read_manifest(ckpt)["num_blocks"]
    # map_location: a GPU run's stages save from cuda:0, cuda:1, ...; compare on the host.
    return {i: torch.load(block_file(ckpt, i), map_location="cpu", weights_only=False)
            for i in range(n)}


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


def interrupt_after_checkpoint(
    cmd: list[str], run_dir: Path, sig: int = 2, **popen: Any
) -> tuple[int, str]:
    """Start ``cmd`` (a training run writing ``run_dir``), send it ``sig`` (SIGINT) once its
    first checkpoint exists, and return its exit status and output."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not latest.exists():
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"no checkpoint was written:\n{out[-3000:]}")
    proc.send_signal(signal.Signals(sig))
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread per process: exactness needs the same count in reference and stages,
    and on a busy 2-core machine more threads mostly spin-wait (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_signals() -> Iterator[None]:
    """A test that calls ``main(["train", ...])`` installs its Ctrl-C / SIGTERM handlers; give
    pytest its own back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray instance started once (about 20 s here) and shut down after the session."""
    import ray

    from pipelocal.launch.ray import start_local

    start_local(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
