"""Balancing the stages by profiling: time every block, choose the partition, predict the throughput
(``pipelocal plan`` prints it; an automatic partition uses it).

Each block is built on the target device and timed over a few training steps on a random batch
of the configured size (forward + local loss + backward + step: everything a stage does per
block). Memory per block counts parameters, gradients and optimiser state, the activations kept
for the backward pass and the receive buffers of the channel feeding it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelocal.config import Config
from pipelocal.engine import build_blocks, train_end_to_end
from pipelocal.models import BlockSpec
from pipelocal.pipeline.partition import balanced_partition, stage_ranges
from pipelocal.rules import end_to_end_top

__all__ = ["Balance", "BlockProfile", "balance_partition", "profile_blocks"]

_GIB = 2**30


@dataclass(frozen=True)
class BlockProfile:
    name: str
    time_s: float
    """Seconds per training step of this block on one batch (median of the timed steps)."""
    activation_bytes: int
    """What the block passes on per batch (float32)."""
    state_bytes: int
    """Parameters + gradients + optimiser state."""
    work_bytes: int
    """Activations held for the backward pass (body output, float32), an estimate."""
    param_bytes: int = 0
    """Parameters alone (what a data-parallel all-reduce of its gradients carries)."""

    @property
    def memory_bytes(self) -> int:
        return self.state_bytes + self.work_bytes


def _timed(step: Callable[[], Tensor], device: torch.device, reps: int) -> tuple[float, Tensor]:
    """(median seconds of ``reps`` calls of ``step`` after one warm-up call, its output)."""
    out = step()  # warm-up (allocations, optimiser state)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CPU-GPU sync point: time whole steps
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def profile_blocks(
    cfg: Config,
    specs: Sequence[BlockSpec],
    num_classes: int,
    device: torch.device,
    *,
    reps: int = 3,
) -> list[BlockProfile]:
    """Time each block's training step; blocks that learn end to end together (AugLocal's top
    layers, every block of a global rule) are timed as one step, shared out evenly."""
    b = cfg.data.batch_size
    blocks = build_blocks(cfg, specs, num_classes, range(len(specs)), device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((b, *specs[0].in_shape), generator=gen).to(device)
    y = torch.randint(num_classes, (b,), generator=gen).to(device)
    image = x  # the model's input, for rules that also need it (InfoPro)
    times: list[float] = []
    for block in blocks:
        block.set_epoch(0)
    local = [blk for blk in blocks if not blk.end_to_end]
    top = blocks[len(local):]
    for block in local:
        t, x = _timed(lambda blk=block, x=x: blk.train_step(x, y, image), device, reps)
        times.append(t)
    if top:
        t, _ = _timed(lambda x=x: train_end_to_end(top, x, y), device, reps)
        times += [t / len(top)] * len(top)
    opt_slots = 2 if cfg.optim.name == "adam" else 1
    return [
        BlockProfile(
            name=spec.name,
            time_s=t,
            activation_bytes=4 * b * math.prod(spec.wire_shape),
            state_bytes=4 * sum(p.numel() for p in block.parameters()) * (2 + opt_slots),
            work_bytes=4 * b * math.prod(spec.out_shape) * 3,
            param_bytes=4 * sum(p.numel() for p in block.parameters()),
        )
        for block, spec, t in zip(blocks, specs, times)
    ]


@dataclass(frozen=True)
class Balance:
    """A partition chosen from measured block costs, with the throughput it predicts."""

    partition: list[int]
    profiles: list[BlockProfile]
    batch_size: int
    channel_depth: int
    concurrent: int = 0
    """How many stages can compute at once: on CPU, cores // threads per stage (stages beyond
    it share cores); 0 = every stage (one device each)."""
    together: range = range(0)
    """Blocks that learn end to end together and so share one stage (shown in the table)."""

    def stage_time(self, s: int) -> float:
        return sum(self.profiles[i].time_s for i in stage_ranges(self.partition)[s])

    def stage_memory(self, s: int) -> int:
        r = stage_ranges(self.partition)[s]
        mem = sum(self.profiles[i].memory_bytes for i in r)
        if r.start > 0:  # receive buffers of the channel from the previous stage
            mem += self.channel_depth * self.profiles[r.start - 1].activation_bytes
        return mem

    @property
    def batch_time(self) -> float:
        """Predicted seconds per batch: the slowest stage, or, when stages share cores, the
        total work spread over the stages that can run at once."""
        stages = len(self.partition)
        slowest = max(self.stage_time(s) for s in range(stages))
        if 0 < self.concurrent < stages:
            return max(slowest, sum(p.time_s for p in self.profiles) / self.concurrent)
        return slowest

    @property
    def throughput(self) -> float:
        """Predicted samples/s: one batch per :attr:`batch_time`."""
        return self.batch_size / self.batch_time

    def warnings(self) -> list[str]:
        stages = len(self.partition)
        if 0 < self.concurrent < stages:
            return [f"warning: {stages} stages but only {self.concurrent} can compute at once "
                    f"(CPU cores // threads per stage); the stages share cores, and the "
                    f"prediction accounts for it: use at most {self.concurrent} stages here"]
        return []

    def table(self) -> str:
        lines = [f"{'block':<8} {'ms/batch':>9} {'state MiB':>10} {'act MiB':>8}"]
        for p in self.profiles:
            lines.append(
                f"{p.name:<8} {1e3 * p.time_s:>9.2f} {p.state_bytes / 2**20:>10.2f} "
                f"{p.activation_bytes / 2**20:>8.2f}"
            )
        lines.append("")
        lines.append(f"{'stage':<6} {'blocks':<24} {'ms/batch':>9} {'mem GiB':>8} {'load':>6}")
        slowest = max(self.stage_time(s) for s in range(len(self.partition)))
        for s, r in enumerate(stage_ranges(self.partition)):
            names = ",".join(self.profiles[i].name for i in r)
            t = self.stage_time(s)
            lines.append(
                f"{s:<6} {names:<24} {1e3 * t:>9.2f} {self.stage_memory(s) / _GIB:>8.3f} "
                f"{100 * t / slowest:>5.0f}%"
            )
        single = sum(p.time_s for p in self.profiles)
        lines.append("")
        lines.append(
            f"partition {self.partition}: predicted {self.throughput:,.0f} samples/s "
            f"({single / self.batch_time:.2f}x one process at "
            f"{self.batch_size / single:,.0f} samples/s)"
        )
        if len(self.together) > 1:
            first, last = (self.profiles[i].name for i in (self.together[0], self.together[-1]))
            lines.append(f"blocks {first}..{last} learn end to end from the output loss: one "
                         "stage, timed as one step (shared out evenly above)")
        return "\n".join(lines + self.warnings())


def balance_partition(
    cfg: Config, specs: Sequence[BlockSpec], num_classes: int, device: torch.device
) -> Balance:
    """Profile every block on ``device`` and choose the balanced partition for the config's
    stage count (within ``pipeline.memory_cap_gib``)."""
    profiles = profile_blocks(cfg, specs, num_classes, device)
    top = end_to_end_top(cfg.rule, len(specs))
    partition = balanced_partition(
        [p.time_s for p in profiles],
        cfg.pipeline.stages,
        memory=[p.memory_bytes for p in profiles],
        memory_cap=cfg.pipeline.memory_cap_gib * _GIB,
        together=top,
    )
    concurrent = 0
    if device.type == "cpu":  # stages are processes sharing this machine's cores
        concurrent = max(1, len(os.sched_getaffinity(0)) // max(torch.get_num_threads(), 1))
    return Balance(partition, profiles, cfg.data.batch_size, cfg.pipeline.channel_depth,
                   concurrent, top)
