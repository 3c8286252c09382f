"""Choosing replicas and stages for N devices (``pipelocal plan --devices N``): the predicted
samples/s and memory per device of every layout R x S <= N, beside data-parallel backprop's.

The model, from block costs profiled at each replica's rows (``ceil(B / R)`` of the global
batch B) and a link (point-to-point bandwidth and latency between stages, all-reduce bandwidth
between replicas):

- a stage computes its blocks one after another; after each block's backward its gradients are
  all-reduced over the R replicas (ring: ``2 (R - 1) / R x bytes / bandwidth`` plus ``2 (R - 1)``
  latencies), one all-reduce at a time on the link, each overlapping the blocks after it; the
  stage's cycle ends when its compute and its last all-reduce have;
- activations travel while the stages compute (the channel has ``pipeline.channel_depth``
  buffers), so a stage's cycle is at least its receive and its send;
- stages that share CPU cores (``concurrent`` < R x S) share them: the cycle is at least all the
  processes' compute over the cores' count;
- samples/s = B / the slowest stage's cycle; memory per device = the stage's parameters,
  gradients and optimiser state, the activations its blocks hold for the backward pass at its
  rows, and its receive buffers.

Data-parallel backprop over N ranks: one backprop step of the whole model at ``ceil(B / N)``
rows, its all-reduce of every gradient overlapped with the backward pass (taken as two thirds
of the step) as DDP's buckets are; memory: the whole model's state and activations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelocal.config import Config
from pipelocal.models import BlockSpec
from pipelocal.pipeline.balance import BlockProfile, profile_blocks
from pipelocal.pipeline.partition import balanced_partition, stage_ranges
from pipelocal.pipeline.replicas import replica_rows

__all__ = ["Costs", "Layout", "Link", "allreduce_s", "largest_slice", "plan_layouts",
           "predict_ddp", "predict_layout", "profile_costs"]

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIMES = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_BACKWARD_SHARE = 2 / 3
"""The part of a backprop step that DDP's all-reduce can overlap (the backward pass)."""


@dataclass(frozen=True)
class Link:
    """What the devices' interconnect does, as the model needs it."""

    p2p_bytes_s: float
    """Point-to-point bandwidth between two stages (bytes/s)."""
    latency_s: float
    """Per message."""
    allreduce_bytes_s: float
    """Bandwidth of each ring step of an all-reduce between replicas (bytes/s)."""

    @classmethod
    def parse(cls, text: str) -> Link:
        """``p2p=10GB/s,latency=5us,allreduce=8GB/s`` (each of the three required)."""
        fields: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            key, value = key.strip().lower(), value.strip().lower().replace(" ", "")
            if key in ("p2p", "allreduce"):
                m = re.fullmatch(r"([0-9.e+-]+)([kmgt]?)b/s", value)
                if m:
                    fields[key] = float(m.group(1)) * _UNITS[m.group(2)]
                    continue
            elif key == "latency":
                m = re.fullmatch(r"([0-9.e+-]+)(s|ms|us|ns)", value)
                if m:
                    fields[key] = float(m.group(1)) * _TIMES[m.group(2)]
                    continue
            raise ValueError(f"--link part {part!r} is invalid; accepted: p2p=<n>[k|M|G]B/s, "
                             "latency=<n>s|ms|us|ns, allreduce=<n>[k|M|G]B/s")
        missing = {"p2p", "latency", "allreduce"} - fields.keys()
        if missing:
            raise ValueError(f"--link {text!r} lacks {', '.join(sorted(missing))}; give all "
                             "three, e.g. --link p2p=10GB/s,latency=5us,allreduce=8GB/s")
        if min(fields["p2p"], fields["allreduce"]) <= 0 or fields["latency"] < 0:
            raise ValueError(f"--link {text!r}: bandwidths must be > 0 and latency >= 0")
        return cls(fields["p2p"], fields["latency"], fields["allreduce"])

    def __str__(self) -> str:
        return (f"p2p {self.p2p_bytes_s / 1e9:.2f} GB/s, latency {1e6 * self.latency_s:.0f} us, "
                f"all-reduce {self.allreduce_bytes_s / 1e9:.2f} GB/s")


@dataclass(frozen=True)
class Costs:
    """Block costs profiled at ``rows`` rows per batch."""

    rows: int
    blocks: Sequence[BlockProfile]
    param_bytes: Sequence[int]
    """Each block's parameters (what its all-reduce carries), bytes."""
    backprop_s: float
    """One backprop step of the whole model at these rows (data-parallel backprop's step)."""


def profile_costs(cfg: Config, specs: Sequence[BlockSpec], num_classes: int,
                  device: torch.device, rows: int) -> Costs:
    """Every block's costs under the config's rule, and one backprop step of the whole model
    (``rule.name = glob``), at ``rows`` rows per batch."""
    at = cfg.replace(data={"batch_size": rows})
    blocks = profile_blocks(at, specs, num_classes, device)
    whole = profile_blocks(at.replace(rule={"name": "glob"}), specs, num_classes, device)
    return Costs(rows, blocks, [b.param_bytes for b in blocks], sum(b.time_s for b in whole))


@dataclass(frozen=True)
class Layout:
    """A layout's prediction."""

    replicas: int
    stages: int
    partition: list[int]
    samples_s: float
    memory_bytes: int
    """On the device that holds the most."""
    stage_s: list[float]
    """Each stage's cycle (seconds per batch)."""

    @property
    def devices(self) -> int:
        return self.replicas * self.stages

    def name(self) -> str:
        return f"R={self.replicas} S={self.stages}"


def largest_slice(batch: int, replicas: int) -> int:
    """The rows of the largest replica's slice of a batch (the first one's)."""
    return replica_rows(batch, replicas)[0]


def allreduce_s(nbytes: int, replicas: int, link: Link) -> float:
    """A ring all-reduce of ``nbytes`` over ``replicas`` ranks (0 for one)."""
    if replicas <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (replicas - 1)
    return steps / replicas * nbytes / link.allreduce_bytes_s + steps * link.latency_s


def predict_layout(costs: Costs, *, batch: int, replicas: int, partition: list[int], link: Link,
                   concurrent: int = 0, channel_depth: int = 2) -> Layout:
    """The model's samples/s and memory per device of R = ``replicas`` copies of the pipeline
    with this ``partition``; ``concurrent``: processes that can compute at once (0 = all)."""
    b, cycles, memory = costs.blocks, [], []
    compute_all = 0.0
    for s, r in enumerate(stage_ranges(partition)):
        t = link_free = 0.0
        for i in r:  # all-reduces queue on the link, each overlapping the blocks after it
            t += b[i].time_s
            link_free = max(t, link_free) + allreduce_s(costs.param_bytes[i], replicas, link)
        compute_all += t
        transfers = [link.latency_s + b[i].activation_bytes / link.p2p_bytes_s
                     for i in ((r.start - 1,) if s > 0 else ()) + ((r.stop - 1,)
                               if r.stop < len(b) else ())]
        cycles.append(max(t, link_free, *transfers))
        received = channel_depth * b[r.start - 1].activation_bytes if s > 0 else 0
        memory.append(sum(b[i].memory_bytes for i in r) + received)
    processes = replicas * len(partition)
    if 0 < concurrent < processes:  # the cores are shared: all the work over them
        floor = replicas * compute_all / concurrent
        cycles = [max(c, floor) for c in cycles]
    return Layout(replicas, len(partition), list(partition), batch / max(cycles), max(memory),
                  cycles)


def predict_ddp(costs: Costs, *, batch: int, replicas: int, link: Link,
                concurrent: int = 0) -> Layout:
    """Data-parallel backprop over ``replicas`` ranks, as one layout of one stage."""
    step = costs.backprop_s
    exposed = max(0.0, allreduce_s(sum(costs.param_bytes), replicas, link)
                  - _BACKWARD_SHARE * step)
    cycle = step + exposed
    if 0 < concurrent < replicas:
        cycle = max(cycle, replicas * step / concurrent)
    memory = sum(p.memory_bytes for p in costs.blocks)
    return Layout(replicas, 1, [len(costs.blocks)], batch / cycle, memory, [cycle])


def plan_layouts(costs_by_rows: dict[int, Costs], *, batch: int, devices: int, link: Link,
                 max_stages: int, together: range = range(0), concurrent: int = 0,
                 channel_depth: int = 2) -> list[Layout]:
    """Every layout R x S <= ``devices`` (the balanced partition for each), best first."""
    out = []
    for replicas in range(1, min(devices, batch) + 1):
        costs = costs_by_rows[largest_slice(batch, replicas)]
        times = [p.time_s for p in costs.blocks]
        for stages in range(1, min(devices // replicas, max_stages) + 1):
            partition = balanced_partition(times, stages, together=together)
            out.append(predict_layout(costs, batch=batch, replicas=replicas,
                                      partition=partition, link=link, concurrent=concurrent,
                                      channel_depth=channel_depth))
    return sorted(out, key=lambda lay: (-lay.samples_s, lay.devices))
