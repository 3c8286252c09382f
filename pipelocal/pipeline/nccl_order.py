"""NCCL's ordering of point-to-point ops, emulated over gloo, so that CPU tests see GPU hangs.

NCCL runs every op of one communicator on one stream, in the order the rank posted them: an op
starts only when the one posted before it has completed, whatever its peer or direction (and a
send completes only once its peer has posted the matching receive). gloo matches sends and
receives by tag and runs them independently, so a channel layout that deadlocks on GPUs passes
every CPU test. :class:`SerialTransport` closes that gap: it posts the ops of each group that
would be NCCL on a GPU through one thread per group, strictly one after the other, in posting
order; the ops of a gloo-only group (headers, control) pass straight through, as on a GPU.

Turn it on for a run with ``PIPELOCAL_NCCL_ORDER=1`` (the workers then log nothing different;
a layout that would hang on GPUs hangs here too, until ``pipeline.timeout_s`` names the stage).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["NCCL_ORDER_ENV", "SerialTransport", "nccl_order_requested"]

NCCL_ORDER_ENV = "PIPELOCAL_NCCL_ORDER"


def nccl_order_requested() -> bool:
    """Whether this process should emulate NCCL's ordering (``PIPELOCAL_NCCL_ORDER=1``)."""
    return os.environ.get(NCCL_ORDER_ENV, "") == "1"


class _Work:
    """Completion of one serialised op, set by its group's thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self._done.wait(seconds):
            raise RuntimeError(f"timed out after {seconds:g} s behind the ops posted before it "
                               "on the same communicator")
        if self._error is not None:
            raise RuntimeError(f"an op on this communicator failed: {self._error}")
        return True


class _Stream:
    """One communicator's stream: posted ops run one at a time, in order, on a daemon thread."""

    def __init__(self) -> None:
        self._ops: queue.Queue[tuple[Callable[[], Any], _Work]] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="nccl-order").start()

    def post(self, start: Callable[[], Any]) -> _Work:
        work = _Work()
        self._ops.put((start, work))
        return work

    def _run(self) -> None:
        broken: BaseException | None = None
        while True:
            start, work = self._ops.get()
            if broken is None:
                try:
                    start().wait()  # the real gloo op, bounded by its group's timeout
                except BaseException as exc:  # the stream is broken: fail what follows
                    broken = exc
            work.finish(broken)


class SerialTransport:
    """A :class:`~pipelocal.pipeline.channel.Transport` with NCCL's one-stream-per-group order.

    ``serial(group)`` says whether ``group`` would be an NCCL communicator on GPUs (its ops are
    serialised); other groups pass straight to ``torch.distributed``.
    """

    def __init__(self, serial: Callable[[Any], bool]) -> None:
        self._serial = serial
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()

    def _stream(self, group: Any) -> _Stream:
        with self._lock:
            return self._streams.setdefault(id(group), _Stream())

    def _post(self, op: Callable[..., Any], tensor: Tensor, peer: int, group: Any,
              tag: int) -> Any:
        if not self._serial(group):
            return op(tensor, peer, group=group, tag=tag)
        return self._stream(group).post(lambda: op(tensor, peer, group=group, tag=tag))

    def isend(self, tensor: Tensor, dst: int, group: Any, tag: int) -> Any:
        return self._post(dist.isend, tensor, dst, group, tag)

    def irecv(self, tensor: Tensor, src: int, group: Any, tag: int) -> Any:
        return self._post(dist.irecv, tensor, src, group, tag)
