"""Channels between neighbouring stages: one interface, torch.distributed point-to-point below.

A message is ``(kind, step, epoch, rows)`` plus an activation and the labels, and for a
training message the micro-batch it is (index, count, rows of its batch: see
:mod:`pipelocal.microbatch`; one message per micro-batch). On the wire every
message has the same shapes: a header int64 [8], the activation [batch_size, *wire_shape] in
the wire dtype and the labels int64 [batch_size]. A smaller (last or evaluation) batch is padded
and ``rows`` says how many rows are real. Fixed shapes let the receiver post the receives for the
next messages before it computes on the current one, so transfers overlap compute. A channel
built with ``image_shape`` also carries the model's input image [batch_size, *image_shape]
(float32, whatever the wire dtype) for rules that need it at every stage (InfoPro).

The header travels in host memory over a gloo group of its own, the tensors over the group of
their pipeline edge: one group per neighbour pair (stage s, stage s + 1), NCCL between GPUs.
One communicator per edge matters on GPUs: NCCL completes the point-to-point ops of one
communicator in the order they were posted, on one stream, and a middle stage posts the receive
of message m + 1 before it sends message m on; over one shared communicator that send would
wait for a receive that only comes after the end-of-epoch gather, which waits for that send
(:mod:`pipelocal.pipeline.nccl_order` emulates this ordering over gloo, for the tests). On its
own edge each communicator carries one direction only, so the k-th send meets the k-th receive.

Waiting never blocks the host on a GPU: an NCCL tensor receive is waited without a timeout,
which only orders the current stream after the transfer (with a timeout, ``Work.wait`` blocks
the CPU thread until the transfer ends), while the header wait, on gloo, has the timeout and
bounds a dead neighbour. So a GPU stage learns what comes next, and queues its kernels, while
the previous batch still runs.

Both ends are bounded by ``depth``: at most ``depth`` sends in flight (the sender waits for the
oldest), and ``depth`` receives posted ahead. Every wait has a timeout; a failed or timed-out
transfer raises :class:`PeerError`, naming the stage, the peer and the batch.

Clean end: after STOP the sender sends ``depth - 1`` TRAILER messages, exactly the receives the
other end still has posted, and the receiver waits for them (:meth:`P2PChannel.drain`). Nothing
is left posted, so every rank can leave through ``destroy_process_group`` (NCCL's watchdog would
otherwise time out a receive that is never matched).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from pipelocal.microbatch import WHOLE, MicroBatch

__all__ = ["Kind", "Message", "P2PChannel", "PeerError", "Transport", "tensor_wait_timeout"]

_HEADER = 8
_TAG_HEADER, _TAG_X, _TAG_Y, _TAG_IMAGE = 0, 1, 2, 3


class Kind(enum.IntEnum):
    TRAIN = 0
    EVAL = 1
    END_EPOCH = 2
    END_EVAL = 3
    CHECKPOINT = 4
    STOP = 5
    TRAILER = 6
    """Sent after STOP to match a receive posted ahead; carries nothing."""
    IDEAL = 7
    """Measure the concurrent ideal (``pipeline.ideal_steps``) after an epoch."""


class PeerError(RuntimeError):
    """A transfer to or from a neighbouring stage failed: most often that stage died first."""


class Transport(Protocol):
    """Posts point-to-point ops: ``torch.distributed`` itself, or a test double over it."""

    def isend(self, tensor: Tensor, dst: int, group: Any, tag: int) -> Any: ...

    def irecv(self, tensor: Tensor, src: int, group: Any, tag: int) -> Any: ...


class _Dist:
    def isend(self, tensor: Tensor, dst: int, group: Any, tag: int) -> Any:
        return dist.isend(tensor, dst, group=group, tag=tag)

    def irecv(self, tensor: Tensor, src: int, group: Any, tag: int) -> Any:
        return dist.irecv(tensor, src, group=group, tag=tag)


def tensor_wait_timeout(backend: str, timeout: timedelta) -> timedelta | None:
    """The timeout to wait on a tensor transfer with: none on NCCL (a wait with a timeout blocks
    the host until the transfer ends; without one it orders the current stream only), else
    ``timeout`` (gloo completes on the host; the wait is the bound on a dead peer)."""
    return None if backend == "nccl" else timeout


@dataclass
class Message:
    kind: Kind
    step: int = -1
    epoch: int = -1
    x: Tensor | None = None
    y: Tensor | None = None
    image: Tensor | None = None
    """The model's input batch, carried along for rules that need it (else None)."""
    part: MicroBatch = WHOLE
    """Which micro-batch of its training batch this message carries."""

    @property
    def rows(self) -> int:
        return 0 if self.y is None else int(self.y.shape[0])


@dataclass
class _Slot:
    header: Tensor
    x: Tensor
    y: Tensor
    image: Tensor | None = None
    works: list[tuple[Any, timedelta | None]] | None = None


class P2PChannel:
    """Sends to stage ``stage + 1`` and/or receives from stage ``stage - 1`` (ranks ``dst`` and
    ``src``: the neighbours' global ranks, by default ``stage`` +- 1).

    ``data_group`` carries the tensors (this edge's group; None: the default group) and
    ``data_backend`` names its backend; ``header_group`` the headers (gloo; None: the default
    group, in CPU tests). ``transport`` posts the ops (``torch.distributed`` by default).
    """

    def __init__(
        self,
        *,
        stage: int,
        batch_size: int,
        wire_shape_in: tuple[int, ...] | None,
        wire_shape_out: tuple[int, ...] | None,
        wire_dtype: torch.dtype,
        depth: int,
        timeout_s: float,
        device: torch.device,
        header_group: dist.ProcessGroup | None = None,
        data_group: dist.ProcessGroup | None = None,
        data_backend: str = "gloo",
        image_shape: tuple[int, ...] | None = None,
        transport: Transport | None = None,
        src: int | None = None,
        dst: int | None = None,
    ) -> None:
        self.stage, self.batch_size, self.depth = stage, batch_size, depth
        # The peers' global ranks: stage - 1 and stage + 1 unless given (replicas, the feed).
        self.src = stage - 1 if src is None else src
        self.dst = stage + 1 if dst is None else dst
        self.header_group = header_group  # gloo; None = the default group (CPU tests)
        self.data_group = data_group
        self.transport: Transport = transport or _Dist()
        self.image_shape = image_shape
        self.sent_bytes = 0
        """Payload bytes handed to the transport (header, activation, labels, image)."""
        self.wire_dtype, self.device = wire_dtype, device
        self.timeout = timedelta(seconds=timeout_s)
        self._tensor_timeout = tensor_wait_timeout(data_backend, self.timeout)
        self.wire_shape_out = wire_shape_out
        self.recv_wait_s = 0.0
        self.send_wait_s = 0.0
        self.recv_s = 0.0
        """Seconds inside :meth:`recv`, its wait included (the rest: posting the next receive,
        reading the header; on CPU the transport's copy when its thread runs right then)."""
        self.send_s = 0.0
        """Seconds inside :meth:`send`, its wait for a free slot included."""
        self._sends: deque[tuple[list[tuple[Any, timedelta | None]], tuple[Tensor, ...], int]] = \
            deque()
        self._slots: list[_Slot] = []
        self._next = 0
        self._pending_repost: int | None = None
        if wire_shape_in is not None:
            for _ in range(depth):
                slot = _Slot(
                    torch.empty(_HEADER, dtype=torch.int64),  # host memory, see module doc
                    torch.empty((batch_size, *wire_shape_in), dtype=wire_dtype, device=device),
                    torch.empty(batch_size, dtype=torch.int64, device=device),
                    self._image_buffer(),
                )
                self._post(slot)
                self._slots.append(slot)

    def _image_buffer(self) -> Tensor | None:
        if self.image_shape is None:
            return None
        return torch.zeros((self.batch_size, *self.image_shape), device=self.device)

    # ------------------------------------------------------------------ receiving

    def _post(self, slot: _Slot) -> None:
        src, t = self.src, self.transport
        tensors = [(slot.x, _TAG_X), (slot.y, _TAG_Y)]
        if slot.image is not None:
            tensors.append((slot.image, _TAG_IMAGE))
        slot.works = [(t.irecv(slot.header, src, self.header_group, _TAG_HEADER), self.timeout)]
        slot.works += [(t.irecv(buf, src, self.data_group, tag), self._tensor_timeout)
                       for buf, tag in tensors]

    def _wait(self, works: list[tuple[Any, timedelta | None]], what: str, step: int | str) -> None:
        try:
            for work, timeout in works:
                if timeout is None:
                    work.wait()  # NCCL: orders the current stream after the transfer; no host wait
                else:
                    work.wait(timeout)
        except Exception as exc:
            raise PeerError(
                f"stage {self.stage}: {what} failed at batch {step} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the neighbouring stage has "
                f"most likely failed or been stopped first, or exceeded pipeline.timeout_s = "
                f"{self.timeout.total_seconds():g}"
            ) from exc

    def recv(self) -> Message:
        """The next message from stage ``stage - 1``; its tensors stay valid until the next call."""
        t_call = time.perf_counter()
        if self._pending_repost is not None:  # the previous message is consumed: reuse its slot
            self._post(self._slots[self._pending_repost])
        index = self._next
        slot = self._slots[index]
        t0 = time.perf_counter()
        # The header wait is a host wait (gloo); on NCCL the tensor waits only order the
        # current stream after the transfers (see the module doc).
        self._wait(slot.works or [], f"receive from stage {self.stage - 1}", "next")
        slot.works = None
        self.recv_wait_s += time.perf_counter() - t0
        kind, step, epoch, rows, *part = (int(v) for v in slot.header[:7].tolist())  # host
        self._pending_repost, self._next = index, (index + 1) % self.depth
        image = None if slot.image is None else slot.image[:rows]
        self.recv_s += time.perf_counter() - t_call
        return Message(Kind(kind), step, epoch, slot.x[:rows], slot.y[:rows], image,
                       MicroBatch(*part))

    @property
    def posted(self) -> int:
        """Receives posted and not yet completed (0 after :meth:`drain`)."""
        return sum(slot.works is not None for slot in self._slots)

    @property
    def in_flight(self) -> int:
        """Sends queued and not yet known to be delivered (0 after :meth:`flush`)."""
        return len(self._sends)

    def drain(self) -> None:
        """After STOP: wait for the TRAILERs that match the receives still posted."""
        self._pending_repost = None  # STOP's slot is not posted again
        for _ in range(self.depth - 1):
            slot = self._slots[self._next]
            self._wait(slot.works or [], f"end-of-run trailer from stage {self.stage - 1}", "-")
            kind = Kind(int(slot.header[0]))
            if kind != Kind.TRAILER:
                raise PeerError(
                    f"stage {self.stage}: expected a TRAILER after STOP, got {kind.name}")
            slot.works = None
            self._next = (self._next + 1) % self.depth

    # ------------------------------------------------------------------ sending

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for stage ``stage + 1``; blocks while ``depth`` sends are in flight."""
        assert self.wire_shape_out is not None
        t_call = time.perf_counter()
        rows, b = msg.rows, self.batch_size
        header = torch.zeros(_HEADER, dtype=torch.int64)  # host memory, gloo
        p = msg.part
        header[:7] = torch.tensor([int(msg.kind), msg.step, msg.epoch, rows, p.index, p.count,
                                   p.batch_rows])
        if rows == b and msg.x is not None and msg.x.dtype == self.wire_dtype:
            x = msg.x.contiguous()  # a fresh output tensor: sent as it is, no copy
        else:
            x = torch.zeros((b, *self.wire_shape_out), dtype=self.wire_dtype, device=self.device)
            if rows:
                x[:rows] = msg.x
        # Always a copy: the labels may be a view of a receive buffer that is about to be reused.
        # They are on the device already (the stage moved them): a device-to-device copy.
        y = torch.zeros(b, dtype=torch.int64, device=self.device)
        if rows:
            y[:rows] = msg.y
        while len(self._sends) >= self.depth:
            self._drain_one()
        dst, t = self.dst, self.transport
        tensors = (header, x, y, *self._image_to_send(msg))
        works = [(t.isend(header, dst, self.header_group, _TAG_HEADER), self.timeout)]
        works += [(t.isend(buf, dst, self.data_group, tag), self._tensor_timeout)
                  for buf, tag in zip(tensors[1:], (_TAG_X, _TAG_Y, _TAG_IMAGE))]
        self.sent_bytes += sum(t.numel() * t.element_size() for t in tensors)
        self._sends.append((works, tensors, msg.step))  # keep tensors alive until sent
        self.send_s += time.perf_counter() - t_call

    def _image_to_send(self, msg: Message) -> tuple[Tensor, ...]:
        """() without an image path; else the image batch, padded like x (a copy, as y)."""
        image = self._image_buffer()
        if image is None:
            return ()
        if msg.rows and msg.image is not None:
            image[: msg.rows] = msg.image
        return (image,)

    def _drain_one(self) -> None:
        works, _, step = self._sends.popleft()
        t0 = time.perf_counter()
        self._wait(works, f"send to stage {self.stage + 1}", step)
        self.send_wait_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every queued send has been delivered."""
        while self._sends:
            self._drain_one()

    def close(self) -> None:
        """After sending STOP: one TRAILER per receive the next stage still has posted, then
        wait until all of it is delivered."""
        for _ in range(self.depth - 1):
            self.send(Message(Kind.TRAILER))
        self.flush()
