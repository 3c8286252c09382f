"""Where a stage runs: the stage count, the device of each rank, CPU threads per rank, a Ray
actor's GPU.

Every decision here is a pure function (:func:`auto_stages`, :func:`place_stage`,
:func:`cpu_threads`, :func:`stage_cpus`, :func:`ray_gpu_index`), so it is tested on CPU over a
table of cases.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from pipelocal.config import Config, ConfigError

__all__ = ["auto_stages", "bind_stage", "cpu_threads", "place_stage", "ray_gpu_index",
           "stage_cpus", "visible_gpus"]


def visible_gpus(cfg: Config) -> int:
    """CUDA devices this process may use: 0 when ``run.device = "cpu"`` or none is visible."""
    return 0 if cfg.run.device == "cpu" else torch.cuda.device_count()


def auto_stages(
    *, requested: int, partition: int, gpus: int, num_blocks: int, is_global: bool
) -> tuple[int, str]:
    """The stage count (``pipeline.stages = 0`` = automatic) and why, for the run's first line.

    One stage per GPU, so that no two ranks of one NCCL communicator share a device (NCCL
    refuses that: "Duplicate GPU detected"); one GPU therefore means the single-process engine.
    On CPU, 2 stages. Never more stages than blocks; backprop rules always run in one process.
    """
    if requested:
        return requested, f"{requested} stage(s) as configured"
    if partition:
        return partition, f"{partition} stages, one per entry of pipeline.partition"
    if is_global:
        return 1, "1 stage: a backprop rule cannot be pipelined"
    if gpus:
        stages = min(gpus, num_blocks)
        return stages, f"{stages} stage(s), one per GPU ({gpus} visible)"
    stages = min(2, num_blocks)
    return stages, f"{stages} stages on CPU (no GPU visible)"


def place_stage(
    *, stages: int, gpus_per_node: int, nodes: int, local_rank: int, device: str
) -> torch.device:
    """The device of the stage with ``local_rank`` on its node, or a ConfigError saying what to do.

    ``device`` is ``run.device`` (auto, cpu, cuda). On GPUs each stage owns one device,
    ``cuda:<local_rank>``; an S that does not fit the GPUs fails here, before any process starts.
    """
    if device == "cpu" or (device == "auto" and gpus_per_node == 0):
        return torch.device("cpu")
    if gpus_per_node == 0:
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if stages > gpus_per_node * nodes:
        raise ConfigError(
            f"pipeline.stages = {stages} but only {gpus_per_node * nodes} GPU(s) are visible "
            f"({nodes} node(s) x {gpus_per_node}); one stage needs one GPU (NCCL cannot put two "
            f"ranks on one device): use at most {gpus_per_node * nodes} stages, or "
            "run.device = 'cpu'"
        )
    if local_rank >= gpus_per_node:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own: this node has {gpus_per_node} "
            f"GPU(s); start at most {gpus_per_node} processes per node (torchrun "
            f"--nproc-per-node {gpus_per_node})"
        )
    return torch.device("cuda", local_rank)


def cpu_threads(configured: int, stages_on_node: int, cores: int | None = None) -> int:
    """torch threads per stage: ``configured`` if > 0, else this process's cores // stages.

    Cores come from the CPU affinity mask (``os.sched_getaffinity``), which Slurm cgroups,
    ``taskset`` and container CPU sets restrict; ``os.cpu_count`` would oversubscribe them.
    """
    if configured:
        return configured
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return max(1, cores // max(stages_on_node, 1))


def stage_cpus(local_rank: int, local_world: int, threads: int,
               available: Iterable[int]) -> frozenset[int] | None:
    """The cores stage process ``local_rank`` of the ``local_world`` on its node is bound to:
    its own ``threads`` of the ``available`` ones (the affinity mask), in local-rank order.

    None (not bound) where the stages' threads outnumber the cores, since bound processes could
    then not share them out, or where its share is every core (nothing to bind).
    """
    cores = sorted(available)
    if not 0 <= local_rank < local_world or threads < 1:
        raise ValueError(f"local rank {local_rank} of {local_world}, {threads} thread(s)")
    if local_world * threads > len(cores):
        return None
    mine = frozenset(cores[local_rank * threads:(local_rank + 1) * threads])
    return None if len(mine) == len(cores) else mine


def bind_stage(local_rank: int, local_world: int, threads: int) -> frozenset[int] | None:
    """Bind every thread of this process (threads started later inherit it) to the cores
    :func:`stage_cpus` gives it within its affinity mask; returns them (None: not bound)."""
    cores = stage_cpus(local_rank, local_world, threads, os.sched_getaffinity(0))
    if cores is not None:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    return cores


def ray_gpu_index(gpu_ids: list[Any], visible: str | None, noset: bool) -> int | None:
    """The CUDA ordinal of a Ray actor's GPU, or None without one.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs, so its GPU is ``cuda:0``. With
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it does not, and the actor sees every GPU
    of its node: its GPU is the position of its Ray GPU id among the visible devices (Ray's
    ids are entries of the node's ``CUDA_VISIBLE_DEVICES`` when that is set, else ordinals).
    """
    if not gpu_ids:
        return None
    if not noset:
        return 0
    gpu = str(gpu_ids[0])
    if visible:
        entries = [e.strip() for e in visible.split(",")]
        if gpu not in entries:
            raise ConfigError(f"Ray gave this actor GPU {gpu}, which CUDA_VISIBLE_DEVICES = "
                              f"{visible!r} does not list")
        return entries.index(gpu)
    return int(gpu)
