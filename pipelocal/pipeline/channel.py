"""Channels between neighbouring stages: one interface, torch.distributed point-to-point below.

A message is ``(kind, step, epoch, rows)`` plus an activation and the labels. On the wire every
message has the same shapes: a header int64 [8], the activation [batch_size, *wire_shape] in
the wire dtype and the labels int64 [batch_size]. A smaller (last or evaluation) batch is padded
and ``rows`` says how many rows are real. Fixed shapes let the receiver post the receives for the
next messages before it computes on the current one, so transfers overlap compute. A channel
built with ``image_shape`` also carries the model's input image [batch_size, *image_shape]
(float32, whatever the wire dtype) for rules that need it at every stage (InfoPro).

The header travels in host memory over a gloo group of its own, the tensors over the default
group (NCCL between GPUs). Reading the header therefore never synchronises the device: a GPU
stage learns what comes next and queues its kernels while the previous batch still runs.

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

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Kind", "Message", "P2PChannel", "PeerError"]

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


class PeerError(RuntimeError):
    """A transfer to or from a neighbouring stage failed: most often that stage died first."""


@dataclass
class Message:
    kind: Kind
    step: int = -1
    epoch: int = -1
    x: Tensor | None = None
    y: Tensor | None = None
    image: Tensor | None = None
    """The model's input batch, carried along for rules that need it (else None)."""

    @property
    def rows(self) -> int:
        return 0 if self.y is None else int(self.y.shape[0])


@dataclass
class _Slot:
    header: Tensor
    x: Tensor
    y: Tensor
    image: Tensor | None = None
    works: list[dist.Work] | None = None


class P2PChannel:
    """Sends to stage ``dst`` and/or receives from stage ``src`` over the default process group."""

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
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.stage, self.batch_size, self.depth = stage, batch_size, depth
        self.header_group = header_group  # gloo; None = the default group (CPU tests)
        self.image_shape = image_shape
        self.sent_bytes = 0
        """Payload bytes handed to the transport (header, activation, labels, image)."""
        self.wire_dtype, self.device = wire_dtype, device
        self.timeout = timedelta(seconds=timeout_s)
        self.wire_shape_out = wire_shape_out
        self.recv_wait_s = 0.0
        self.send_wait_s = 0.0
        self._sends: deque[tuple[list[dist.Work], tuple[Tensor, ...], int]] = deque()
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
        src = self.stage - 1
        slot.works = [
            dist.irecv(slot.header, src, group=self.header_group, tag=_TAG_HEADER),
            dist.irecv(slot.x, src, tag=_TAG_X),
            dist.irecv(slot.y, src, tag=_TAG_Y),
        ]
        if slot.image is not None:
            slot.works.append(dist.irecv(slot.image, src, tag=_TAG_IMAGE))

    def _wait(self, works: list[dist.Work], what: str, step: int | str) -> None:
        try:
            for work in works:
                work.wait(self.timeout)
        except Exception as exc:
            raise PeerError(
                f"stage {self.stage}: {what} failed at batch {step} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the neighbouring stage has "
                f"most likely failed or been stopped first, or exceeded pipeline.timeout_s = "
                f"{self.timeout.total_seconds():g}"
            ) from exc

    def recv(self) -> Message:
        """The next message from stage ``stage - 1``; its tensors stay valid until the next call."""
        if self._pending_repost is not None:  # the previous message is consumed: reuse its slot
            self._post(self._slots[self._pending_repost])
        index = self._next
        slot = self._slots[index]
        t0 = time.perf_counter()
        # On NCCL the tensor waits only order the current stream after the transfer (no host
        # block); the header wait is a host wait on gloo: the whole receive wait on CPU.
        self._wait(slot.works or [], f"receive from stage {self.stage - 1}", "next")
        slot.works = None
        self.recv_wait_s += time.perf_counter() - t0
        kind, step, epoch, rows = (int(v) for v in slot.header[:4].tolist())  # host tensor
        self._pending_repost, self._next = index, (index + 1) % self.depth
        image = None if slot.image is None else slot.image[:rows]
        return Message(Kind(kind), step, epoch, slot.x[:rows], slot.y[:rows], image)

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
        rows, b = msg.rows, self.batch_size
        header = torch.zeros(_HEADER, dtype=torch.int64)  # host memory, gloo
        header[:4] = torch.tensor([int(msg.kind), msg.step, msg.epoch, rows])
        if rows == b and msg.x is not None and msg.x.dtype == self.wire_dtype:
            x = msg.x.contiguous()  # a fresh output tensor: sent as it is, no copy
        else:
            x = torch.zeros((b, *self.wire_shape_out), dtype=self.wire_dtype, device=self.device)
            if rows:
                x[:rows] = msg.x
        # Always a copy: the labels may be a view of a receive buffer that is about to be reused.
        y = torch.zeros(b, dtype=torch.int64, device=self.device)
        if rows:
            y[:rows] = msg.y
        while len(self._sends) >= self.depth:
            self._drain_one()
        dst = self.stage + 1
        tensors = (header, x, y, *self._image_to_send(msg))
        groups = (self.header_group, None, None, None)  # the header over gloo, see module doc
        tags = (_TAG_HEADER, _TAG_X, _TAG_Y, _TAG_IMAGE)
        works = [dist.isend(t, dst, group=g, tag=tag) for t, g, tag in zip(tensors, groups, tags)]
        self.sent_bytes += sum(t.numel() * t.element_size() for t in tensors)
        self._sends.append((works, tensors, msg.step))  # keep tensors alive until sent

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
