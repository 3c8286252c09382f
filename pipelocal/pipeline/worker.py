"""The one worker body every launcher runs (spawn, torchrun, Ray): rank r of R replicas of an
S-stage pipeline (rank = replica * S + stage; R = pipeline.replicas, usually 1).

    configure the device (placement, threads, determinism) before any CUDA call
    join the process group, one group per pipeline edge (s, s + 1) of each replica for the
    tensors (NCCL on GPU, gloo on CPU) and two gloo groups (control, headers); with replicas
    also the feeds (0, r * S) and one group per stage over its replicas
    (:mod:`pipelocal.pipeline.replicas`)
    receive the RunSpec from rank 0
    build_stage(...)                 -> Stage: the engine over this rank's blocks + its channels
    rank 0: build_trainer(...).fit()    the coordinator drives the pipeline through stage 0
    others: stage.serve()               until STOP
    teardown()                          nothing is left posted, so the group is destroyed cleanly

A launcher only decides where ranks run and how they find each other (``store`` or the
environment); failures propagate as exceptions for the launcher to report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.config import Config
from pipelocal.determinism import configure_determinism
from pipelocal.device import bind_stage, cpu_threads, place_stage, visible_gpus
from pipelocal.engine import Engine, build_blocks, piece_rows
from pipelocal.hostmem import keep_host_memory
from pipelocal.pipeline.channel import P2PChannel
from pipelocal.pipeline.nccl_order import SerialTransport, nccl_order_requested
from pipelocal.pipeline.partition import stage_ranges
from pipelocal.pipeline.pipe import DistPipe
from pipelocal.pipeline.replicas import ReplicaSync, feed_groups, layout, stage_groups
from pipelocal.pipeline.stage import Stage
from pipelocal.rules import RULES
from pipelocal.runspec import Position, RunSpec
from pipelocal.trainer import build_trainer

__all__ = ["ReplicaGroups", "build_stage", "configure_rank", "coordinator_feeds", "edge_groups",
           "feed_channel", "run_rank", "wire_dtype"]


def wire_dtype(cfg: Config) -> torch.dtype:
    """pipeline.wire_dtype, where auto follows run.precision."""
    name = cfg.pipeline.wire_dtype
    if name == "auto":
        name = "bfloat16" if cfg.run.precision == "bf16" else "float32"
    return getattr(torch, name)


def _needs_image(cfg: Config) -> bool:
    return RULES.get(cfg.rule.name).needs_image


def configure_rank(
    cfg: Config, *, world: int, local_rank: int, local_world: int, nodes: int,
    bind_cpus: bool = True,
) -> torch.device:
    """Device, threads, cores and determinism of this rank; before its first CUDA call and
    before its process group starts threads. ``bind_cpus``: whether the launcher knows the
    node's stages (spawn, torchrun: local rank of local world) so that pipeline.bind_cpus
    applies."""
    device = place_stage(stages=world, gpus_per_node=visible_gpus(cfg), nodes=nodes,
                         local_rank=local_rank, device=cfg.run.device)
    configure_determinism(device, cfg.run.deterministic)
    keep_host_memory()  # a torchrun rank started without launch/torchrun.sh's settings
    threads = cpu_threads(cfg.pipeline.threads_per_stage, local_world)
    if device.type == "cpu" and bind_cpus and cfg.pipeline.bind_cpus:
        bind_stage(local_rank, local_world, threads)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def edge_groups(world: int, backend: str, timeout: timedelta,
                replicas: int = 1) -> list[dist.ProcessGroup]:
    """One process group per pipeline edge, ranks (s, s + 1) of each replica's pipeline (edge s
    of replica r at index r * (stages - 1) + s): its own NCCL communicator and stream on GPUs
    (see :mod:`pipelocal.pipeline.channel`). Every rank creates every edge's group, in the same
    order, as ``new_group`` requires."""
    stages = world // replicas
    return [dist.new_group([r * stages + s, r * stages + s + 1], backend=backend,
                           timeout=timeout)
            for r in range(replicas) for s in range(stages - 1)]


def build_stage(
    spec: RunSpec,
    *,
    rank: int,
    world: int,
    device: torch.device,
    control: dist.ProcessGroup,
    headers: dist.ProcessGroup,
    edges: list[dist.ProcessGroup],
    backend: str,
    groups: ReplicaGroups | None = None,
) -> Stage:
    """Rank ``rank``'s stage: its blocks (resumed if the run resumes) between its channels;
    ``edges[r * (S - 1) + s]`` carries the tensors between stages s and s + 1 of replica r over
    ``backend``; ``groups``: the replicas' feed and stage groups (None: one replica)."""
    cfg, specs = spec.cfg, spec.specs
    replicas = cfg.pipeline.replicas
    stages = world // replicas
    replica, stage = layout(rank, stages)
    r = stage_ranges(cfg.pipeline.partition)[stage]
    engine = Engine(build_blocks(cfg, specs, spec.num_classes, r, device),
                    micro_batches=cfg.pipeline.micro_batches)
    if spec.resume is not None:
        engine.load(spec.resume)  # every replica from the same files
    sync = None
    if groups is not None:
        sync = ReplicaSync(groups.stages[stage], replica=replica, replicas=replicas, stage=stage,
                           backend=backend, timeout_s=cfg.pipeline.timeout_s)
        engine.share_gradients(sync)
    feeds = groups.feeds if groups is not None else []
    wire = _wire(spec, stage=stage, device=device, headers=headers, backend=backend,
                 data_groups=[*edges, *feeds])
    edge = replica * (stages - 1) + stage  # this stage's outgoing edge
    inbox = None
    if stage > 0:
        inbox = P2PChannel(wire_shape_in=specs[r.start - 1].wire_shape, wire_shape_out=None,
                           data_group=edges[edge - 1], src=rank - 1, **wire)
    elif replica > 0:  # its rows of every batch come from the coordinator
        inbox = feed_channel(spec, wire, feeds[replica - 1], peer=rank, send=False)
    outbox = (P2PChannel(wire_shape_in=None, wire_shape_out=specs[r.stop - 1].wire_shape,
                         data_group=edges[edge], dst=rank + 1, **wire)
              if stage < stages - 1 else None)
    return Stage(stage, engine, inbox=inbox, outbox=outbox, control=control,
                 run_dir=spec.run_dir, start=spec.start, epochs=cfg.run.epochs, rank=rank,
                 sync=sync, ideal_steps=cfg.pipeline.ideal_steps)


def _wire(spec: RunSpec, *, stage: int, device: torch.device, headers: dist.ProcessGroup,
          backend: str, data_groups: list[dist.ProcessGroup]) -> dict[str, Any]:
    """The settings every channel of stage ``stage`` shares."""
    cfg = spec.cfg
    return dict(
        # A message is one micro-batch: the wire holds the largest one (the batch with M = 1).
        stage=stage, batch_size=piece_rows(cfg), depth=cfg.pipeline.channel_depth,
        wire_dtype=wire_dtype(cfg), timeout_s=cfg.pipeline.timeout_s, device=device,
        header_group=headers, data_backend=backend,
        # PIPELOCAL_NCCL_ORDER=1: the edges' ops complete in posting order, as on NCCL.
        transport=SerialTransport(lambda g: any(g is e for e in data_groups))
        if nccl_order_requested() else None,
        # InfoPro: the model's input image travels with the activation to every later stage.
        image_shape=spec.specs[0].in_shape if _needs_image(cfg) else None,
    )


def feed_channel(spec: RunSpec, wire: dict[str, Any], group: dist.ProcessGroup, *,
                 peer: int, send: bool) -> P2PChannel:
    """The coordinator's channel to rank ``peer``, a replica's first stage: the model's input in
    float32 (as stage 0 reads it from the loader), whatever the wire dtype."""
    shape = spec.specs[0].in_shape
    return P2PChannel(**{**wire, "stage": 0, "wire_dtype": torch.float32, "image_shape": None},
                      wire_shape_in=None if send else shape,
                      wire_shape_out=shape if send else None, data_group=group,
                      src=0, dst=peer)


def coordinator_feeds(spec: RunSpec, groups: ReplicaGroups, *, device: torch.device,
                      headers: dist.ProcessGroup, backend: str,
                      edges: list[dist.ProcessGroup]) -> list[P2PChannel]:
    """Rank 0's channels to replicas 1 .. R - 1's first stages."""
    stages = spec.cfg.pipeline.stages
    wire = _wire(spec, stage=0, device=device, headers=headers, backend=backend,
                 data_groups=[*edges, *groups.feeds])
    return [feed_channel(spec, wire, g, peer=(i + 1) * stages, send=True)
            for i, g in enumerate(groups.feeds)]


@dataclass(frozen=True)
class ReplicaGroups:
    """The process groups of data-parallel replicas (see :mod:`pipelocal.pipeline.replicas`)."""

    feeds: list[dist.ProcessGroup]
    """(0, r * S) for r = 1 .. R - 1: the coordinator to each replica's first stage."""
    stages: list[dist.ProcessGroup]
    """One per stage: its R replicas, for the gradient all-reduce."""


def run_rank(
    cfg: Config,
    spec: RunSpec | None,
    *,
    rank: int,
    world: int,
    local_rank: int,
    local_world: int,
    nodes: int = 1,
    store: dist.Store | None = None,
    stage_box: list[Stage] | None = None,
    on_phase: Callable[[str, Position | None], None] | None = None,
    bind_cpus: bool = True,
) -> dict[str, Any] | None:
    """Run rank ``rank`` to the end; returns the training summary on rank 0.

    ``spec`` is needed on rank 0 only (the others receive it). ``stage_box`` receives the
    Stage as soon as it exists, so that a launcher can report where a failure happened;
    ``on_phase`` is told the phase and position of each message (see :attr:`Stage.on_phase`);
    ``bind_cpus``: see :func:`configure_rank`.
    """
    device = configure_rank(cfg, world=world, local_rank=local_rank, local_world=local_world,
                            nodes=nodes, bind_cpus=bind_cpus)
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    # Statistics, set-up and checkpoints go over a gloo group, never over the data path; the
    # message headers over another, so that reading one never waits for the device.
    control = dist.new_group(backend="gloo", timeout=timeout)
    headers = dist.new_group(backend="gloo", timeout=timeout)
    replicas = cfg.pipeline.replicas
    stages = world // replicas
    edges = edge_groups(world, backend, timeout, replicas)
    groups = None
    if replicas > 1:  # created after the edges, in the same order on every rank
        groups = ReplicaGroups(feed_groups(stages, replicas, backend, timeout),
                               stage_groups(stages, replicas, backend, timeout))
    box = [spec]
    dist.broadcast_object_list(box, src=0, group=control)
    spec = box[0]
    assert spec is not None
    stage = build_stage(spec, rank=rank, world=world, device=device, control=control,
                        headers=headers, edges=edges, backend=backend, groups=groups)
    stage.on_phase = on_phase
    if stage_box is not None:
        stage_box.append(stage)
    result = None
    feeds = []
    if rank == 0 and groups is not None:
        feeds = coordinator_feeds(spec, groups, device=device, headers=headers, backend=backend,
                                  edges=edges)
    if rank == 0:
        pipe = DistPipe(stage, num_stages=stages, wire_batch=piece_rows(spec.cfg),
                        feeds=feeds)
        where = (f"pipelined over {stages} stages {list(spec.cfg.pipeline.partition)} "
                 + (f"x {replicas} replicas " if replicas > 1 else "")
                 + f"({backend}, {device.type})")
        result = build_trainer(spec, pipe, where=where).fit()
        pipe.close()
    else:
        stage.serve()
    _teardown(stage, feeds)
    return result


def _teardown(stage: Stage, feeds: list[P2PChannel]) -> None:
    """Destroy the process group once no transfer is left posted or in flight."""
    channels = [("inbox", stage.inbox), ("outbox", stage.outbox),
                *((f"feed to replica {i + 1}", ch) for i, ch in enumerate(feeds))]
    left = [(name, ch.posted, ch.in_flight) for name, ch in channels
            if ch is not None and (ch.posted or ch.in_flight)]
    if left:
        raise RuntimeError(f"stage {stage.stage}: transfers left at shutdown (channel, posted "
                           f"receives, sends in flight): {left}")
    if stage.engine.device.type == "cuda":
        # A waited NCCL work only ordered our stream after it; let every kernel, the NCCL
        # stream's included, finish before the communicators go.
        torch.cuda.synchronize(stage.engine.device)  # CPU-GPU sync point, once per run
    dist.destroy_process_group()
