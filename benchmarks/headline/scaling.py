"""A scaling model: throughput and per-device memory of the three peers for S = 1..16 devices.

Inputs, all measured on the target device by the benchmark (or by hand from ``pipelocal plan``):
per block, the time of its local training step and of its share of a backprop step, the bytes it
passes on, the bytes autograd saves for its backward and its parameter + gradient + optimiser
bytes; the link's latency and bandwidth. Assumptions, each visible in the error against the
measured S:

* a stage's work per batch is the sum of its blocks' times measured alone, times
  ``contention`` (1 by default: devices of their own; the benchmark passes the slowdown it
  measured when S processes share this machine's cores);
* a message costs ``latency + bytes / bandwidth`` on both ends and does not overlap compute;
* pipelocal (c): S stages over a balanced contiguous split; an epoch of n batches takes
  ``sum_k t_k + (n - 1) * max_k t_k`` (fill and drain once per epoch); memory per device =
  state + the largest saved-for-backward of one of its blocks + ``channel_depth`` batches in
  flight on each side;
* torch pipelining (d), M micro-batches: one step takes ``(M + S - 1) * max_k t_mb,k`` (the
  GPipe and 1F1B bubble) plus the slowest stage's optimiser step (once per batch), a
  micro-batch's forward and backward costing what its blocks were measured to cost at its
  rows when the benchmark measured them (else 1/M of the batch's: small micro-batches run less
  efficiently, so the model is then optimistic for large M);
  activations held: all M micro-batches for GPipe, ``min(M, S - k)`` of them for 1F1B stage k;
* backprop on one device (a): the sum of the blocks' backprop times, all activations held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelocal.pipeline.partition import balanced_partition, stage_ranges

__all__ = [
    "BlockCost",
    "Link",
    "predict_backprop",
    "predict_pipelocal",
    "predict_torchpipe",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockCost:
    """One block's measured costs for one batch (times in seconds, sizes in bytes)."""

    name: str
    local_s: float
    """Its local training step (forward, local loss, backward, optimiser step), alone."""
    glob_s: float
    """Its forward + backward + optimiser step inside an end-to-end backprop step."""
    wire_bytes: int
    """What it passes on to the next block (its gradient has the same size)."""
    saved_local_bytes: int
    """Peak bytes saved for backward during its local step."""
    saved_glob_bytes: int
    """Bytes its forward saves for backward under backprop (held until the backward)."""
    state_local_bytes: int
    """Parameters + gradients + optimiser state, with its local-loss heads."""
    state_glob_bytes: int
    """The same without local heads."""
    glob_opt_s: float = 0.0
    """The optimiser step's part of ``glob_s``: once per batch, whatever the micro-batches."""

    def __post_init__(self) -> None:
        if min(self.local_s, self.glob_s, self.glob_opt_s) < 0:
            raise ValueError(f"block {self.name}: negative time {self.local_s}, {self.glob_s}")
        if self.glob_opt_s > self.glob_s:
            raise ValueError(f"block {self.name}: its optimiser step ({self.glob_opt_s} s) is "
                             f"longer than its whole backprop step ({self.glob_s} s)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """Point-to-point transport between two devices."""

    latency_s: float
    bytes_per_s: float

    def cost(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s if nbytes else 0.0


def _stage_comm(blocks: Sequence[BlockCost], ranges: list[range], k: int, link: Link,
                scale: float = 1.0, both_ways: bool = False) -> float:
    """Seconds stage k spends receiving its input and sending its output (x2: gradients too)."""
    ways = 2 if both_ways else 1
    t = 0.0
    if k > 0:
        t += ways * link.cost(scale * blocks[ranges[k].start - 1].wire_bytes)
    if k < len(ranges) - 1:
        t += ways * link.cost(scale * blocks[ranges[k][-1]].wire_bytes)
    return t


def predict_backprop(blocks: Sequence[BlockCost], batch_size: int) -> dict[str, Any]:
    """(a) End-to-end backprop on one device."""
    step = sum(b.glob_s for b in blocks)
    act = sum(b.saved_glob_bytes for b in blocks)
    state = sum(b.state_glob_bytes for b in blocks)
    return {
        "throughput(samples/s)": batch_size / step,
        "activation(B)": act,
        "state(B)": state,
        "memory_per_device(B)": act + state,
    }


def predict_pipelocal(
    blocks: Sequence[BlockCost],
    stages: int,
    *,
    batch_size: int,
    batches: int,
    link: Link,
    channel_depth: int,
    partition: Sequence[int] | None = None,
    contention: float = 1.0,
) -> dict[str, Any]:
    """(c) pipelocal with ``stages`` stages over ``batches`` batches per epoch; ``contention``:
    how much slower a stage computes while the others do (1: devices of their own)."""
    part = list(partition or balanced_partition([b.local_s for b in blocks], stages))
    ranges = stage_ranges(part)
    t = [
        contention * sum(blocks[i].local_s for i in r) + _stage_comm(blocks, ranges, k, link)
        for k, r in enumerate(ranges)
    ]
    epoch = sum(t) + (batches - 1) * max(t)
    mem = []
    for k, r in enumerate(ranges):
        wire_in = blocks[r.start - 1].wire_bytes if k > 0 else 0
        wire_out = blocks[r[-1]].wire_bytes if k < len(ranges) - 1 else 0
        act = max(blocks[i].saved_local_bytes for i in r)
        inflight = channel_depth * (wire_in + wire_out)
        state = sum(blocks[i].state_local_bytes for i in r)
        mem.append({"activation(B)": act, "in_flight(B)": inflight, "state(B)": state,
                    "total(B)": act + inflight + state})
    return {
        "partition": part,
        "stage_time(s)": t,
        "throughput(samples/s)": batches * batch_size / epoch,
        "memory_per_stage": mem,
        "memory_per_device(B)": max(m["total(B)"] for m in mem),
        "activation_per_device(B)": max(m["activation(B)"] for m in mem),
    }


def predict_torchpipe(
    blocks: Sequence[BlockCost],
    stages: int,
    *,
    schedule: str,
    microbatches: int,
    batch_size: int,
    link: Link,
    partition: Sequence[int] | None = None,
    contention: float = 1.0,
    micro: Sequence[BlockCost] | None = None,
) -> dict[str, Any]:
    """(d) Backprop pipelined over ``stages`` stages, GPipe or 1F1B, ``microbatches`` per batch
    (``contention`` as for :func:`predict_pipelocal`). ``micro``: the blocks' backprop costs
    measured at one micro-batch's rows (small batches run less efficiently than 1/M of a
    large one); without it a micro-batch costs 1/M of the batch."""
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"schedule {schedule!r} is unknown; accepted: gpipe, 1f1b")
    m = microbatches
    part = list(partition or balanced_partition([b.glob_s for b in blocks], stages))
    ranges = stage_ranges(part)
    rows = micro if micro is not None else blocks
    per_mb = [
        contention * sum(rows[i].glob_s - rows[i].glob_opt_s for i in r)
        / (1 if micro is not None else m)
        + _stage_comm(blocks, ranges, k, link, scale=1 / m, both_ways=True)
        for k, r in enumerate(ranges)
    ]
    # Each stage steps its optimiser once, after the batch's last micro-batch.
    opt = [contention * sum(blocks[i].glob_opt_s for i in r) for r in ranges]
    step = (m + stages - 1) * max(per_mb) + max(opt)
    mem = []
    for k, r in enumerate(ranges):
        held = m if schedule == "gpipe" else min(m, stages - k)
        act = sum(blocks[i].saved_glob_bytes for i in r) * held / m
        state = sum(blocks[i].state_glob_bytes for i in r)
        mem.append({"activation(B)": act, "state(B)": state, "total(B)": act + state})
    return {
        "partition": part,
        "microbatches": m,
        "throughput(samples/s)": batch_size / step,
        "memory_per_stage": mem,
        "memory_per_device(B)": max(x["total(B)"] for x in mem),
        "activation_per_device(B)": max(x["activation(B)"] for x in mem),
    }
