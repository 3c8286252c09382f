"""The one worker body every launcher runs (spawn, torchrun, Ray): rank r of an S-stage pipeline.

    configure the device (placement, threads, determinism) before any CUDA call
    join the process group, one group per pipeline edge (s, s + 1) for the tensors (NCCL on
    GPU, gloo on CPU) and two gloo groups (control, headers)
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
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.config import Config
from pipelocal.determinism import configure_determinism
from pipelocal.device import cpu_threads, place_stage, visible_gpus
from pipelocal.engine import Engine, build_blocks, piece_rows
from pipelocal.pipeline.channel import P2PChannel
from pipelocal.pipeline.nccl_order import SerialTransport, nccl_order_requested
from pipelocal.pipeline.partition import stage_ranges
from pipelocal.pipeline.pipe import DistPipe
from pipelocal.pipeline.stage import Stage
from pipelocal.rules import RULES
from pipelocal.runspec import Position, RunSpec
from pipelocal.trainer import build_trainer

__all__ = ["build_stage", "configure_rank", "edge_groups", "run_rank", "wire_dtype"]


def wire_dtype(cfg: Config) -> torch.dtype:
    """pipeline.wire_dtype, where auto follows run.precision."""
    name = cfg.pipeline.wire_dtype
    if name == "auto":
        name = "bfloat16" if cfg.run.precision == "bf16" else "float32"
    return getattr(torch, name)


def _needs_image(cfg: Config) -> bool:
    return RULES.get(cfg.rule.name).needs_image


def configure_rank(
    cfg: Config, *, world: int, local_rank: int, local_world: int, nodes: int
) -> torch.device:
    """Device, threads and determinism of this rank; before its first CUDA call."""
    device = place_stage(stages=world, gpus_per_node=visible_gpus(cfg), nodes=nodes,
                         local_rank=local_rank, device=cfg.run.device)
    configure_determinism(device, cfg.run.deterministic)
    torch.set_num_threads(cpu_threads(cfg.pipeline.threads_per_stage, local_world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def edge_groups(world: int, backend: str, timeout: timedelta) -> list[dist.ProcessGroup]:
    """One process group per pipeline edge, ranks (s, s + 1): its own NCCL communicator and
    stream on GPUs (see :mod:`pipelocal.pipeline.channel`). Every rank creates every edge's
    group, in the same order, as ``new_group`` requires."""
    return [dist.new_group([s, s + 1], backend=backend, timeout=timeout)
            for s in range(world - 1)]


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
) -> Stage:
    """Rank ``rank``'s stage: its blocks (resumed if the run resumes) between its channels;
    ``edges[s]`` carries the tensors between stages s and s + 1 over ``backend``."""
    cfg, specs = spec.cfg, spec.specs
    r = stage_ranges(cfg.pipeline.partition)[rank]
    engine = Engine(build_blocks(cfg, specs, spec.num_classes, r, device),
                    micro_batches=cfg.pipeline.micro_batches)
    if spec.resume is not None:
        engine.load(spec.resume)
    wire = dict(
        # A message is one micro-batch: the wire holds the largest one (the batch with M = 1).
        stage=rank, batch_size=piece_rows(cfg), depth=cfg.pipeline.channel_depth,
        wire_dtype=wire_dtype(cfg), timeout_s=cfg.pipeline.timeout_s, device=device,
        header_group=headers, data_backend=backend,
        # PIPELOCAL_NCCL_ORDER=1: the edges' ops complete in posting order, as on NCCL.
        transport=SerialTransport(lambda g: any(g is e for e in edges))
        if nccl_order_requested() else None,
        # InfoPro: the model's input image travels with the activation to every later stage.
        image_shape=specs[0].in_shape if _needs_image(cfg) else None,
    )
    inbox = (P2PChannel(wire_shape_in=specs[r.start - 1].wire_shape, wire_shape_out=None,
                        data_group=edges[rank - 1], **wire) if rank > 0 else None)
    outbox = (P2PChannel(wire_shape_in=None, wire_shape_out=specs[r.stop - 1].wire_shape,
                         data_group=edges[rank], **wire) if rank < world - 1 else None)
    return Stage(rank, engine, inbox=inbox, outbox=outbox, control=control,
                 run_dir=spec.run_dir, start=spec.start, epochs=cfg.run.epochs)


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
) -> dict[str, Any] | None:
    """Run rank ``rank`` to the end; returns the training summary on rank 0.

    ``spec`` is needed on rank 0 only (the others receive it). ``stage_box`` receives the
    Stage as soon as it exists, so that a launcher can report where a failure happened;
    ``on_phase`` is told the phase and position of each message (see :attr:`Stage.on_phase`).
    """
    device = configure_rank(cfg, world=world, local_rank=local_rank, local_world=local_world,
                            nodes=nodes)
    timeout = timedelta(seconds=cfg.pipeline.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    # Statistics, set-up and checkpoints go over a gloo group, never over the data path; the
    # message headers over another, so that reading one never waits for the device.
    control = dist.new_group(backend="gloo", timeout=timeout)
    headers = dist.new_group(backend="gloo", timeout=timeout)
    edges = edge_groups(world, backend, timeout)
    box = [spec]
    dist.broadcast_object_list(box, src=0, group=control)
    spec = box[0]
    assert spec is not None
    stage = build_stage(spec, rank=rank, world=world, device=device, control=control,
                        headers=headers, edges=edges, backend=backend)
    stage.on_phase = on_phase
    if stage_box is not None:
        stage_box.append(stage)
    result = None
    if rank == 0:
        pipe = DistPipe(stage, num_stages=world, wire_batch=piece_rows(spec.cfg))
        where = (f"pipelined over {world} stages {list(spec.cfg.pipeline.partition)} "
                 f"({backend}, {device.type})")
        result = build_trainer(spec, pipe, where=where).fit()
        pipe.close()
    else:
        stage.serve()
    _teardown(stage)
    return result


def _teardown(stage: Stage) -> None:
    """Destroy the process group once no transfer is left posted or in flight."""
    left = [(name, ch.posted, ch.in_flight) for name, ch in (("inbox", stage.inbox),
                                                             ("outbox", stage.outbox))
            if ch is not None and (ch.posted or ch.in_flight)]
    if left:
        raise RuntimeError(f"stage {stage.stage}: transfers left at shutdown (channel, posted "
                           f"receives, sends in flight): {left}")
    if stage.engine.device.type == "cuda":
        # A waited NCCL work only ordered our stream after it; let every kernel, the NCCL
        # stream's included, finish before the communicators go.
        torch.cuda.synchronize(stage.engine.device)  # CPU-GPU sync point, once per run
    dist.destroy_process_group()
