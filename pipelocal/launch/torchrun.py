"""``torchrun --nproc-per-node S -m pipelocal train ...``: this process is one rank of S.

torchrun (torchelastic) starts, watches and restarts the processes; rank 0 validates the run
and finds the partition, then every rank runs the same worker body as under ``--stages S``.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.config import Config, ConfigError
from pipelocal.determinism import configure_determinism
from pipelocal.device import visible_gpus
from pipelocal.exits import exit_status, write_status
from pipelocal.launch.preflight import Placement, preflight
from pipelocal.pipeline.worker import run_rank
from pipelocal.runspec import RunSpec
from pipelocal.stop import die_with_parent, install_stop_handlers

__all__ = ["torchrun_stages", "torchrun_worker", "under_torchrun"]

_FORWARDED_S = 2.0
"""A second Ctrl-C / SIGTERM this soon after the first is the same one: torchrun's agent
forwards to every rank the signal it got, which a terminal or Slurm also sent them."""


def under_torchrun() -> bool:
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE",
                                                                   "MASTER_ADDR"))


def torchrun_stages(stages: int, replicas: int, world: int) -> int:
    """The stage count of a torchrun job of ``world`` processes: world / replicas, one process
    per stage of each replica; ``stages`` (pipeline.stages, 0 = automatic) must agree."""
    if world % replicas:
        raise ConfigError(
            f"pipeline.replicas = {replicas} but torchrun started {world} processes, not a "
            f"multiple of {replicas}; each replica runs one process per stage: start replicas x "
            f"stages processes (e.g. {replicas * max(world // replicas, 1)}) or change "
            "pipeline.replicas")
    if stages not in (0, world // replicas):
        if replicas == 1:
            raise ConfigError(
                f"pipeline.stages = {stages} but torchrun started {world} processes; "
                f"one process runs one stage: set pipeline.stages = {world} or start "
                f"{stages} processes")
        raise ConfigError(
            f"pipeline.stages = {stages} x pipeline.replicas = {replicas} but torchrun started "
            f"{world} processes; one process runs one stage of one replica: set "
            f"pipeline.stages = {world // replicas} or start {stages * replicas} processes")
    return world // replicas


def _attempt_store(cfg: Config, rank: int, world: int) -> dist.Store:
    """The job's store, with keys private to this attempt of the job.

    torchrun keeps its store across restarts (``--max-restarts``); process groups created on it
    by a failed attempt would leave keys (peer addresses) that the restarted ranks would read.
    """
    env = os.environ
    agent_hosts_it = env.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size=world,
                         is_master=rank == 0 and not agent_hosts_it,
                         timeout=timedelta(seconds=cfg.pipeline.timeout_s))
    return dist.PrefixStore(f"pipelocal/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def torchrun_worker(cfg: Config, resume: str | Path | None) -> dict[str, Any] | None:
    """Run this torchrun rank; returns the training summary on rank 0."""
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    die_with_parent(os.getppid())  # the torchrun agent: if it is killed, so is this rank
    stages = torchrun_stages(cfg.pipeline.stages, cfg.pipeline.replicas, world)
    cfg = cfg.replace(pipeline={"stages": stages})
    # Before rank 0 profiles on its GPU below: cuBLAS reads its workspace setting when it
    # creates a handle, so the flags must precede the first CUDA op (run_rank sets them again).
    configure_determinism(torch.device("cuda" if visible_gpus(cfg) else "cpu"),
                          cfg.run.deterministic)
    # Every rank stops through rank 0 (the coordinator), which alone says so.
    install_stop_handlers(announce=rank == 0, same_within_s=_FORWARDED_S)
    spec: RunSpec | None = None
    if rank == 0:
        spec = preflight(cfg, resume, placement=Placement(
            nodes=world // local_world,
            note=f"{world} torchrun processes, one per stage"
            + (f" of {cfg.pipeline.replicas} replicas" if cfg.pipeline.replicas > 1 else "")))
    try:
        return run_rank(cfg, spec, rank=rank, world=world, local_rank=local_rank,
                        local_world=local_world, nodes=world // local_world,
                        store=_attempt_store(cfg, rank, world))
    except BaseException as exc:
        # torchelastic sees the exit code and stops the other ranks; a process group with
        # transfers that can never complete must not be torn down by the interpreter's exit.
        known = exit_status(exc)  # a NaN, a full disk: one line and its status, as elsewhere
        if known is None:
            traceback.print_exc()
        else:
            print(known[1], file=sys.stderr)
        code = known[0] if known else 1
        if rank == 0:
            write_status(code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
