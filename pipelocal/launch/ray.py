"""``pipelocal train --launcher ray``: each stage is a Ray actor; this process supervises them.

    driver (this process)                      actor r (one per stage, in a placement group)
      validate, partition, run directory         ----------------------------------------
      placement group: one bundle per stage      rank 0: TCPStore master (its node, a free port)
      actors; rank 0 opens the store   ------>   join gloo/NCCL via the store, run_rank(...)
      ray.wait on the S run futures              rank 0: the coordinator (Trainer) over stage 0
      Ctrl-C / SIGTERM -> actor 0.stop()         activations: actor -> actor over the process
      first failure: kill all, remove the group  group, never through the driver

Ray places the actors, owns their lifecycle and detects their death; the data path is the same
torch.distributed channel as under ``--stages S`` and torchrun (gloo on CPU, NCCL between GPU
actors), set up as Ray Train does for its workers: rank 0 hosts the store, the driver hands its
address to the others. A Ray channel would carry every activation through Ray's own transport,
and for GPU tensors Ray's Direct Transport is alpha and Compiled Graphs are in maintenance, so
a torch.distributed NCCL group is the conservative choice.

**Why the coordinator lives in rank 0's actor, not in the driver.** The coordinator feeds stage
0 every batch; in the driver that would be a Ray call (or a transfer) per batch, which the
design forbids, or a second process group that includes the driver. In rank 0's actor it is the
same worker body as under every other launcher, so a Ray run is bitwise equal to the others by
construction. The driver still runs the run: it validates and partitions before any actor
starts, opens the run directory, forwards stop requests, sees the epoch lines (Ray forwards the
actors' output to it) and gets the summary from one ``ray.get`` at the end.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipelocal.checkpoint import last_complete_note
from pipelocal.config import Config, ConfigError
from pipelocal.device import ray_gpu_index
from pipelocal.hostmem import HOST_MALLOC_ENV
from pipelocal.launch.preflight import Placement, preflight
from pipelocal.launch.ray_reaper import Reaper, start_reaper
from pipelocal.launch.report import (
    Death,
    describe_failure,
    failure_report,
    forward_stop_signals,
    raise_outcome,
    replica_stages,
)
from pipelocal.launch.spawn import PipelineError
from pipelocal.pipeline.stage import Stage
from pipelocal.pipeline.worker import run_rank
from pipelocal.runspec import RunSpec
from pipelocal.stop import Interrupted, clear_stop, request_stop, stop_requested

__all__ = ["ACTOR_PREFIX", "StageActor", "ray_train", "start_local"]

ACTOR_PREFIX = "pipelocal-stage"
"""Actors are named ``pipelocal-stage<r>-<run id>`` (``ray list actors`` shows them)."""
_GRACE_S = 2.0
"""After a stage died: how long the others get to report where they were before being killed."""
_POLL_S = 0.5
"""How often the driver looks at stop requests while it waits for the actors (seconds)."""
_NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
_FORWARDED_ENV = "PIPELOCAL_"
"""Driver environment variables with this prefix reach the actors (e.g. fault injection)."""


class StageActor:
    """One pipeline stage: rank ``rank`` of ``world``. Threaded (two calls at once) so that
    :meth:`stop` reaches rank 0 while :meth:`run` is busy training."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._store: dist.TCPStore | None = None

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def open_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on this node's address and a free port."""
        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, world_size=self.world, is_master=True,
                                    wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        return host, self._store.port

    def run(self, cfg: Config, spec: RunSpec | None, host: str, port: int) -> dict[str, Any]:
        """The worker body; returns {"result": summary on rank 0} or {"failure": report}."""
        clear_stop()
        stage_box: list[Stage] = []
        try:
            store = self._store or dist.TCPStore(
                host, port, world_size=self.world, is_master=False,
                timeout=timedelta(seconds=cfg.pipeline.timeout_s))
            # To the placement rule every actor is a node of its own; its GPU is the one Ray
            # gave it: cuda:0 where Ray masks CUDA_VISIBLE_DEVICES to it (the default), its
            # position among the visible GPUs where RAY_EXPERIMENTAL_NOSET_... keeps them all.
            gpu = ray_gpu_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                bool(os.environ.get(_NOSET_ENV)))
            # Ray places the actors (and their CPUs) itself: no binding to cores here.
            result = run_rank(cfg, spec, rank=self.rank, world=self.world, local_rank=gpu or 0,
                              local_world=1, nodes=self.world, store=store, stage_box=stage_box,
                              bind_cpus=False)
            return {"result": result}
        except BaseException as exc:  # the driver kills every actor, then raises it
            return {"failure": failure_report(self.rank, stage_box, exc)}

    def stop(self) -> None:
        """Checkpoint at the current step and stop (rank 0 checks before every batch)."""
        request_stop()


def ray_train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Validate, place one actor per stage, run, and supervise; the summary of rank 0's run."""
    clear_stop()
    started = _connect(cfg)
    try:
        cfg, placement, gpus_each = _on_cluster(cfg)
        return _launch(preflight(cfg, resume, placement=placement), gpus_each)
    finally:
        if started:
            ray.shutdown()
            started.close()


def _connect(cfg: Config) -> Reaper | None:
    """Join the configured cluster, or start a local Ray instance (and its reaper, returned)."""
    if ray.is_initialized():
        return None
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return None
    # A local instance gets at least one logical CPU per stage (S processes on fewer cores,
    # as under --stages S) and the GPUs this process sees.
    stages = (cfg.pipeline.stages or len(cfg.pipeline.partition) or 2) * cfg.pipeline.replicas
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    start_local(num_cpus=max(cores or 1, math.ceil(stages * cfg.ray.cpus_per_stage)),
                num_gpus=torch.cuda.device_count() if cfg.run.device != "cpu" else 0)
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    return start_reaper(session, os.path.dirname(ray.__file__))  # nothing outlives us


def start_local(**options: Any) -> None:
    """``ray.init`` of a new local instance; tried twice, because Ray gives its raylet a fixed
    30 s to register with the GCS, which a busy machine can miss once."""
    for attempt in (1, 2):
        try:
            ray.init(address="local", **options)
            return
        except Exception as exc:  # Ray raises a bare Exception for this timeout
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise


def _on_cluster(cfg: Config) -> tuple[Config, Placement, int]:
    """The config, placement and GPUs per actor for this cluster: the stage count follows its
    GPUs, and preflight checks that it can hold the actors. Stage actors print no progress bar
    (their output is forwarded line by line); CPU actors run on the CPU."""
    have = ray.cluster_resources()
    gpus = int(have.get("GPU", 0)) if cfg.run.device != "cpu" else 0
    gpus_each = cfg.ray.gpus_per_stage if cfg.ray.gpus_per_stage >= 0 else int(gpus > 0)

    def fits(stages: int) -> None:  # stages: every actor, replicas x pipeline.stages
        need = {"CPU": stages * cfg.ray.cpus_per_stage, "GPU": stages * gpus_each}
        for kind, amount in need.items():
            if amount > have.get(kind, 0):
                raise ConfigError(
                    f"{stages} stage actors need {amount:g} {kind}s (ray.cpus_per_stage = "
                    f"{cfg.ray.cpus_per_stage:g}, GPUs per stage {gpus_each}) but the Ray cluster "
                    f"has {have.get(kind, 0):g}; use fewer stages, lower ray.cpus_per_stage, or "
                    "add nodes")

    threads = cfg.pipeline.threads_per_stage or max(1, int(cfg.ray.cpus_per_stage))
    run = {"progress": False} if gpus_each else {"progress": False, "device": "cpu"}
    cfg = cfg.replace(pipeline={"threads_per_stage": threads}, run=run)
    placement = Placement(gpus=gpus if gpus_each else 0, gpus_per_node=gpus_each, nodes=0,
                          note=f"{{auto}}; Ray actors, {cfg.ray.placement} placement",
                          profile_in_subprocess=True, check=fits)
    return cfg, placement, gpus_each


def _launch(spec: RunSpec, gpus_each: int) -> dict[str, Any]:
    cfg, world = spec.cfg, spec.world
    bundle = {"CPU": cfg.ray.cpus_per_stage, **({"GPU": gpus_each} if gpus_each else {})}
    group = placement_group([dict(bundle) for _ in range(world)],
                            strategy=cfg.ray.placement.upper())
    actors: list[Any] = []
    try:
        if not ray.wait([group.ready()], timeout=cfg.pipeline.timeout_s)[0]:
            raise PipelineError(
                f"Ray could not place {world} stage actors of {bundle} with strategy "
                f"{cfg.ray.placement.upper()} within pipeline.timeout_s = "
                f"{cfg.pipeline.timeout_s:g} s; the cluster has {ray.available_resources()} "
                "available")
        actors = _start_actors(cfg, group, world, gpus_each)
        return _run(spec, actors)
    finally:
        _stop_all(actors)
        remove_placement_group(group)


def _start_actors(cfg: Config, group: Any, world: int, gpus_each: int) -> list[Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
    env |= {k: os.environ.get(k, v) for k, v in HOST_MALLOC_ENV.items()}  # read at start-up
    run_id = uuid.uuid4().hex[:8]
    remote = ray.remote(StageActor)
    return [
        remote.options(
            name=f"{ACTOR_PREFIX}{rank}-{run_id}",
            num_cpus=cfg.ray.cpus_per_stage,
            num_gpus=gpus_each,
            max_concurrency=2,  # run() and stop() at once
            max_restarts=0,  # a lost stage ends the run; the checkpoint is the way back
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": env} if env else None,
        ).remote(rank, world)
        for rank in range(world)
    ]


def _run(spec: RunSpec, actors: list[Any]) -> dict[str, Any]:
    cfg = spec.cfg
    try:  # start-up: one ray.get for every actor's address, not one per batch
        infos = ray.get([a.info.remote() for a in actors], timeout=cfg.pipeline.timeout_s)
        host, port = ray.get(actors[0].open_store.remote(cfg.pipeline.timeout_s),
                             timeout=cfg.pipeline.timeout_s)
    except (RayError, GetTimeoutError) as exc:
        raise PipelineError(f"the Ray stage actors did not start within pipeline.timeout_s = "
                            f"{cfg.pipeline.timeout_s:g} s: {exc}") from exc
    pids = [i["pid"] for i in infos]
    runs = {a.run.remote(cfg, spec if r == 0 else None, host, port): r
            for r, a in enumerate(actors)}
    result, reports, dead = _supervise(actors, runs, pids, spec)
    if result is not None and not reports and dead is None:
        return result
    raise_outcome(reports, spec.run_dir)  # a non-finite loss, a full disk: not a crash
    nodes = {i["rank"]: i["node"] for i in infos}
    raise PipelineError(describe_failure(
        reports, dead, f"the Ray stage actors ended without a result (nodes by rank: {nodes})",
        run_dir=spec.run_dir, stages=replica_stages(spec)))


def _supervise(
    actors: list[Any], runs: dict[Any, int], pids: list[int], spec: RunSpec
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], Death | None]:
    """Wait for the S run futures: the summary, the failure reports, the stage that died."""
    result, reports, dead = None, [], None
    failed_at, stop_sent = None, False
    with forward_stop_signals() as hits:
        while runs:
            if stop_requested() and not stop_sent:
                actors[0].stop.remote()  # fire and forget: rank 0 checkpoints, then STOP flows
                stop_sent = True
            if hits[0] > 1:
                raise Interrupted("aborted by a second interrupt before the checkpoint; "
                                  f"{last_complete_note(spec.run_dir)}")
            ready, _ = ray.wait(list(runs), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                rank = runs.pop(ref)
                try:
                    out = ray.get(ref)
                except RayActorError as exc:  # killed, OOM, node lost
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    dead = dead or Death(rank, pids[rank],
                                         f"its Ray actor was lost ({type(exc).__name__}: {first})")
                    continue
                if "failure" in out:
                    reports.append(out["failure"])
                else:
                    result = out["result"] if rank == 0 else result
            if any(not r["secondary"] for r in reports):
                break  # a stage failed on its own: that is the report, stop the rest now
            if (reports or dead) and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
                break
    return result, reports, dead


def _stop_all(actors: list[Any]) -> None:
    """Kill every stage actor and wait (bounded) until Ray reports each one dead."""
    for a in actors:
        ray.kill(a, no_restart=True)
    deadline = time.monotonic() + 10
    for a in actors:
        while time.monotonic() < deadline:
            try:  # a call on a dead actor fails at once with RayActorError
                ray.get(a.info.remote(), timeout=max(deadline - time.monotonic(), 0.1))
            except (RayError, GetTimeoutError):
                break
            time.sleep(0.05)  # the kill is asynchronous; bounded by the deadline above
