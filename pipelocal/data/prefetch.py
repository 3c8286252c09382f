"""Epoch iteration: the batches of one epoch in order, built ahead of use by one thread.

The batches of one epoch (:func:`epoch_batches`) are made ahead of use, by one background
thread, in the order they are used. A batch stays a pure function of (seed, epoch,
index): the thread calls the same :meth:`BatchLoader.batch` the synchronous path calls, with the
same arguments, so the tensors are bitwise the same (``tests/test_prefetch.py``).

Why one thread and not ``torch.utils.data.DataLoader`` with worker processes: a batch is a
handful of torch ops on a tensor already in memory (gather, convert, augment, normalise), and
torch releases the GIL inside each op, so one thread overlaps them with the stage's compute.
Worker processes would add a copy of the dataset per worker, pickling of every batch through
shared memory, a fork of a process that already runs gloo/NCCL threads, and more processes
competing for the few cores the pipeline stages already use. The thread runs with the process's
intra-op thread count (torch reads the global setting when a new thread first runs a parallel
op), and every op of a batch is elementwise or a copy, whose result does not depend on it.

When the batches go to a CUDA device from a CPU split, the thread also copies them into pinned
(page-locked) memory, so that the trainer's ``x.to(device, non_blocking=True)`` is a real
asynchronous copy. With ``data.on_device`` the split is on the GPU already
(:meth:`BatchLoader.to`) and the thread queues the batch's kernels on the device instead; both
threads use the device's legacy default stream, so the consumer's kernels run after them.

Shutdown: leaving the ``with`` block (end of the epoch, a stop, an exception) sets a stop
event, empties the queue so that a producer blocked on a full queue wakes, and joins the thread
with a timeout. An exception in the thread reaches the consumer with its original traceback.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor

from pipelocal.data.loader import BatchLoader

__all__ = ["EpochBatches", "Prefetcher", "SyncBatches", "epoch_batches"]

_GET_TIMEOUT_S = 600.0
"""Longest wait for one batch from the thread; a batch takes milliseconds, so this means stuck."""
_JOIN_TIMEOUT_S = 60.0
"""Longest wait for the thread to finish the batch it is building after a stop."""


class EpochBatches:
    """Batches ``start`` .. last of one epoch as an iterator and a context manager.

    ``wait_s`` is the time (seconds) the caller has spent inside ``next()``: building a batch
    itself (prefetch off) or waiting for the thread (prefetch on). The trainer logs it per epoch
    as ``data_wait(s)``.
    """

    def __init__(self, loader: BatchLoader, epoch: int, start: int) -> None:
        end = loader.num_batches(epoch)  # builds the epoch's plan on the caller's thread
        if not 0 <= start <= end:
            raise IndexError(
                f"start batch {start} of epoch {epoch} does not exist; this epoch has {end} "
                f"batches, so start must be in 0 .. {end}"
            )
        self.loader, self.epoch, self.next_index, self.end = loader, epoch, start, end
        self.wait_s = 0.0

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.next_index >= self.end:
            raise StopIteration
        t0 = time.perf_counter()
        batch = self._take(self.next_index)
        self.wait_s += time.perf_counter() - t0
        self.next_index += 1
        return batch

    def _take(self, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the iterator holds; safe to call more than once."""

    def __enter__(self) -> EpochBatches:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncBatches(EpochBatches):
    """``data.prefetch = 0``: each batch is built on the caller's thread when it is asked for."""

    def _take(self, index: int) -> tuple[Tensor, Tensor]:
        return self.loader.batch(self.epoch, index)


@dataclass(frozen=True, slots=True)
class _Failure:
    """What the thread puts in the queue instead of batch ``index`` when building it raised."""

    index: int
    error: BaseException


class Prefetcher(EpochBatches):
    """Batches built by a background thread up to ``depth`` ahead of the caller.

    ``pin``: copy each batch into pinned memory (only for a CUDA target; CPU-only builds of
    torch cannot pin). ``device``: the CUDA device the thread makes current, so that pinning
    and on-device builds use the stage's GPU rather than creating a context on GPU 0.
    """

    def __init__(
        self,
        loader: BatchLoader,
        epoch: int,
        start: int = 0,
        *,
        depth: int = 2,
        pin: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(loader, epoch, start)
        if depth < 1:
            raise ValueError(f"depth = {depth} is invalid; accepted: batches ahead >= 1")
        self._queue: queue.Queue[tuple[int, Tensor, Tensor] | _Failure] = queue.Queue(depth)
        self._stop = threading.Event()
        self._pin, self._cuda = pin, None
        if device is not None and device.type == "cuda":  # "cuda" alone: the caller's current
            index = torch.cuda.current_device() if device.index is None else device.index
            self._cuda = torch.device("cuda", index)
        self._thread = threading.Thread(
            target=self._produce, name=f"pipelocal-prefetch-epoch{epoch}", daemon=True
        )
        self._thread.start()

    def _produce(self) -> None:
        index = self.next_index
        try:
            if self._cuda is not None:
                torch.cuda.set_device(self._cuda)  # the current device is per host thread
            for index in range(self.next_index, self.end):
                if self._stop.is_set():
                    return
                x, y = self.loader.batch(self.epoch, index)
                if self._pin:
                    x, y = x.pin_memory(), y.pin_memory()
                self._queue.put((index, x, y))  # blocks while `depth` batches wait
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put(_Failure(index, exc))

    def _take(self, index: int) -> tuple[Tensor, Tensor]:
        try:
            item = self._queue.get(timeout=_GET_TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(
                f"the prefetch thread gave no batch {index} of epoch {self.epoch} within "
                f"{_GET_TIMEOUT_S:.0f} s (thread alive: {self._thread.is_alive()}); "
                "set data.prefetch = 0 to build batches on the training thread"
            ) from None
        if isinstance(item, _Failure):
            self.close()
            item.error.add_note(
                f"raised in the prefetch thread building batch {item.index} of epoch {self.epoch}"
            )
            raise item.error  # keeps the thread's traceback, this frame is added on top
        got, x, y = item
        assert got == index, f"prefetch order broken: expected batch {index}, got {got}"
        return x, y

    def close(self) -> None:
        """Stop the thread and wait for it; raises if it is still running after the timeout."""
        self._stop.set()
        # The thread checks the stop event before each batch, so after this drain it puts at
        # most one more item (the batch it is building), which fits: the queue was emptied.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=_JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            raise TimeoutError(
                f"the prefetch thread of epoch {self.epoch} did not stop within "
                f"{_JOIN_TIMEOUT_S:.0f} s of the stop request; a batch build is stuck"
            )

    @property
    def alive(self) -> bool:
        """Whether the background thread is still running."""
        return self._thread.is_alive()


def epoch_batches(
    loader: BatchLoader, epoch: int, start: int = 0, *, prefetch: int, device: torch.device
) -> EpochBatches:
    """Batches ``start`` .. last of ``epoch`` for a model on ``device``.

    ``prefetch`` = 0: built on the caller's thread; > 0: by a thread, that many ahead, pinned
    when a CPU-built batch goes to a CUDA device.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch = {prefetch} is invalid; accepted: batches ahead >= 0")
    if prefetch == 0:
        return SyncBatches(loader, epoch, start)
    pin = device.type == "cuda" and loader.device.type == "cpu"
    return Prefetcher(loader, epoch, start, depth=prefetch, pin=pin, device=device)
