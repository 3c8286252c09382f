"""Tests for pipelocal.data.prefetch: prefetching (same batches as the synchronous path,
errors, shutdown), a split on a device, and prefetched runs end to end.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelocal.config import ConfigError, load_config
from pipelocal.data import BatchLoader, Split
from pipelocal.data.prefetch import Prefetcher, SyncBatches, epoch_batches
from pipelocal.launch import train
from tests.conftest import assert_identical, checkpoint_tensors, tiny_config

ALL_AUGMENTATIONS = ("jitter", "flip", "padcrop", "cutout")
CPU = torch.device("cpu")


def _split(n: int = 150) -> Split:
    """uint8 CIFAR-like images [n, 3, 12, 12] and labels 0..9."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=gen)
    return Split(x, torch.randint(0, 10, (n,), generator=gen))


def _loader(augment: tuple[str, ...] = ALL_AUGMENTATIONS, **kwargs: object) -> BatchLoader:
    """32 samples a batch, so 150 samples give 5 batches, the last one of 22."""
    return BatchLoader(
        _split(), batch_size=32, seed=11, train=True, mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3), augment=augment, cutout_px=4, **kwargs,  # type: ignore[arg-type]
    )


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pipelocal-prefetch")]


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    assert _prefetch_threads() == [], "a prefetch thread outlived its test"


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize(
    "settings",
    [{"augment": ("padcrop", "flip")}, {"augment": ALL_AUGMENTATIONS, "classes_per_batch": 2}],
    ids=["padcrop+flip", "all+class-limited"],
)
def test_prefetched_epoch_equals_batch(start: int, settings: dict) -> None:
    """Every batch of an epoch (resumed at ``start``) is bitwise ``BatchLoader.batch``."""
    reference = _loader(**settings)
    for epoch in (0, 1):
        expected = [reference.batch(epoch, i) for i in range(start, reference.num_batches(epoch))]
        with Prefetcher(_loader(**settings), epoch, start, depth=2) as batches:
            got = list(batches)
        assert len(got) == len(expected) == reference.num_batches(epoch) - start
        assert_identical(got, expected, f"epoch {epoch}")
    assert got[0][0].shape[1:] == (3, 12, 12)


def test_sync_batches_equal_batch_and_count_the_wait() -> None:
    loader = _loader()
    with SyncBatches(loader, 1, 2) as batches:
        got = list(batches)
    assert_identical(got, [loader.batch(1, i) for i in (2, 3, 4)])
    assert batches.wait_s > 0.0


def test_producer_sees_the_process_thread_count() -> None:
    """torch's intra-op thread count is per process: the producer runs with the caller's."""
    seen: list[int] = []

    class Recording(BatchLoader):
        def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(torch.get_num_threads())
            return super().batch(epoch, index)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = Recording(_split(), batch_size=32, seed=11, train=True, mean=(0.5,) * 3,
                           std=(0.25,) * 3, augment=ALL_AUGMENTATIONS)
        with Prefetcher(loader, 0) as batches:
            got = list(batches)
        assert_identical(got, [loader.batch(0, i) for i in range(loader.num_batches(0))])
    finally:
        torch.set_num_threads(before)
    assert seen[:5] == [2] * 5


class _Broken(BatchLoader):
    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 2:
            _fail_in_producer(index)
        return super().batch(epoch, index)


def _fail_in_producer(index: int) -> None:
    raise ValueError(f"cannot build batch {index}")


def test_producer_exception_reaches_the_consumer_with_its_traceback() -> None:
    loader = _Broken(_split(), batch_size=32, seed=11, train=True, mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    taken = []
    with pytest.raises(ValueError, match="cannot build batch 2") as info:
        with Prefetcher(loader, 0, depth=3) as batches:
            for x, _ in batches:
                taken.append(x)
    assert len(taken) == 2  # batches 0 and 1 arrived before the failure
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "_fail_in_producer" in frames and "_produce" in frames  # the thread's own frames
    assert any("prefetch thread building batch 2 of epoch 0" in n for n in info.value.__notes__)
    assert not batches.alive


@pytest.mark.parametrize("how", ["break", "consumer raises"])
def test_a_cut_epoch_leaves_no_thread(how: str) -> None:
    """Stopping after one batch (a stop request, max_steps, a failing step) ends the thread."""
    batches = Prefetcher(_loader(), 0, depth=1)
    try:
        with batches:
            next(batches)
            assert batches.alive  # the producer is blocked on the full queue
            if how == "consumer raises":
                raise RuntimeError("a training step failed")
    except RuntimeError:
        assert how == "consumer raises"
    assert not batches.alive and _prefetch_threads() == []
    batches.close()  # a second close is harmless


def test_epoch_batches_picks_the_path_and_checks_arguments() -> None:
    loader = _loader()
    with epoch_batches(loader, 0, prefetch=0, device=CPU) as sync:
        assert isinstance(sync, SyncBatches)
    with epoch_batches(loader, 0, prefetch=3, device=CPU) as ahead:
        assert isinstance(ahead, Prefetcher)
        x, _ = next(ahead)
        assert not x.is_pinned()  # a CPU model needs no pinned memory
    with epoch_batches(loader, 0, 5, prefetch=2, device=CPU) as empty:  # resume at the end
        assert list(empty) == []
    with pytest.raises(IndexError, match=r"start must be in 0 \.\. 5"):
        epoch_batches(loader, 0, 6, prefetch=2, device=CPU)
    with pytest.raises(ValueError, match="prefetch = -1"):
        epoch_batches(loader, 0, prefetch=-1, device=CPU)
    with pytest.raises(ValueError, match="depth = 0"):
        Prefetcher(loader, 0, depth=0)


def test_prefetch_config_is_validated() -> None:
    assert load_config(None, []).data.prefetch == 2
    assert load_config(None, ["data.prefetch=0"]).data.prefetch == 0
    with pytest.raises(ConfigError, match=r"data\.prefetch = -1 is invalid"):
        load_config(None, ["data.prefetch=-1"])


# --------------------------------------------------------------------------- split on a device


def test_loader_on_another_device_builds_every_op_there() -> None:
    """The meta device has no data, but mixing it with a CPU tensor fails like CUDA would."""
    loader = _loader()
    assert loader.to("cpu") is loader and loader.device == CPU
    on_meta = loader.to("meta")
    assert on_meta.device.type == "meta" and loader.device == CPU  # the original stays
    with Prefetcher(on_meta, 0, 1) as batches:
        x, y = next(batches)
    assert x.device.type == y.device.type == "meta"
    assert (x.shape, x.dtype, y.shape) == ((32, 3, 12, 12), torch.float32, (32,))


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 2])
def test_uint8_split_on_gpu_gives_the_cpu_batches(prefetch: int) -> None:
    """data.on_device: the batches built on the GPU are bitwise the CPU ones."""
    cuda = torch.device("cuda", 0)
    cpu_loader, gpu_loader = _loader(), _loader().to(cuda)
    assert gpu_loader._split.x.dtype == torch.uint8 and gpu_loader.device == cuda
    with epoch_batches(gpu_loader, 1, prefetch=prefetch, device=cuda) as batches:
        got = [(x.cpu(), y.cpu()) for x, y in batches]
    assert_identical(got, [cpu_loader.batch(1, i) for i in range(cpu_loader.num_batches(1))])


@pytest.mark.gpu
def test_cpu_batches_for_a_gpu_are_pinned() -> None:
    with epoch_batches(_loader(), 0, prefetch=2, device=torch.device("cuda", 0)) as batches:
        x, y = next(batches)
    assert x.is_pinned() and y.is_pinned()
    assert torch.equal(x.to("cuda", non_blocking=True).cpu(), _loader().batch(0, 0)[0])


# --------------------------------------------------------------------------- end to end


def _data_waits(run_dir: str) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["data_wait(s)"] for line in lines]


@pytest.mark.slow
def test_pipeline_with_prefetch_equals_single_process_without(tmp_path: Path) -> None:
    """A 2-stage pipeline fed by the thread == the single-process engine fed synchronously."""
    augment = 'data.augment=["jitter", "flip", "cutout"]'
    reference = train(tiny_config(tmp_path / "ref", augment, "data.cutout_px=4",
                                  "pipeline.stages=1", "data.prefetch=0"))
    piped = train(tiny_config(tmp_path / "pipe", augment, "data.cutout_px=4",
                              "pipeline.stages=2", "data.prefetch=3"))
    assert piped["step"] == reference["step"] == 10
    assert_identical(checkpoint_tensors(piped["run_dir"]), checkpoint_tensors(
        reference["run_dir"]))
    assert piped["test/acc"] == reference["test/acc"]
    for run in (reference, piped):
        waits = _data_waits(run["run_dir"])
        # one float per epoch; a prefetched wait can round to 0.000 s when batches are ready
        assert len(waits) == 2 and all(isinstance(w, float) and w >= 0.0 for w in waits)


@pytest.mark.slow
def test_resume_mid_epoch_with_prefetch_equals_straight_run(tmp_path: Path) -> None:
    """Stop inside epoch 2 without prefetch, resume with it: the same as one straight run."""
    straight = train(tiny_config(tmp_path / "a", "pipeline.stages=1", "data.augment=[\"flip\"]"))
    first = train(tiny_config(tmp_path / "b", "pipeline.stages=1", "data.augment=[\"flip\"]",
                              "data.prefetch=0", "run.max_steps=7"))
    assert first["stopped"] == "max_steps" and first["step"] == 7  # batch 2 of epoch 2 is next
    resumed = train(tiny_config(tmp_path / "b", "pipeline.stages=1", "data.augment=[\"flip\"]",
                                "data.prefetch=3"), resume=first["run_dir"])
    assert resumed["step"] == straight["step"] == 10
    assert_identical(checkpoint_tensors(resumed["run_dir"]), checkpoint_tensors(
        straight["run_dir"]))


def test_trainer_stopped_mid_epoch_leaves_no_thread(tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path, "pipeline.stages=1", "run.max_steps=2", "run.epochs=1"))
    assert result["stopped"] == "max_steps" and result["step"] == 2
    assert _prefetch_threads() == []
