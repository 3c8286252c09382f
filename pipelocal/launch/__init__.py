"""Launching a run: ``train(cfg)`` validates everything it can, then runs the single-process
engine, spawned pipeline workers (:mod:`.spawn`), Ray actors (:mod:`.ray`, with
``pipeline.launcher = "ray"``) or this torchrun rank (:mod:`.torchrun`).
Every pipelined path runs the same worker body, :func:`pipelocal.pipeline.worker.run_rank`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipelocal.checkpoint import read_manifest, resolve_checkpoint, verify_checkpoint
from pipelocal.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    upgrade_saved_config,
)
from pipelocal.determinism import configure_determinism
from pipelocal.device import place_stage, visible_gpus
from pipelocal.engine import Engine, build_blocks, piece_rows
from pipelocal.hostmem import keep_host_memory
from pipelocal.launch import preflight as checks  # the module: its preflight() is checks.preflight
from pipelocal.launch import spawn as spawning  # the module (its spawn() is spawning.spawn)
from pipelocal.launch.run_dir import release_run_dir
from pipelocal.launch.spawn import PipelineError
from pipelocal.launch.torchrun import torchrun_worker, under_torchrun
from pipelocal.metrics import Metrics
from pipelocal.pipeline.pipe import LocalPipe
from pipelocal.runspec import RunSpec
from pipelocal.stop import Interrupted, clear_stop
from pipelocal.trainer import Trainer, build_trainer

__all__ = ["Interrupted", "PipelineError", "evaluate_checkpoint", "train"]


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any] | None:
    """Train as configured: one process, a spawned pipeline, or this rank of a torchrun job.

    Returns the summary (None on torchrun ranks other than 0). The run directory is locked
    for the whole call (a second run on it is refused) and released however the call ends.
    """
    keep_host_memory()  # before any worker, forkserver or profiling process starts
    try:
        done = _already_complete(cfg, resume)
        if done is not None:  # said at once: no worker, no Ray, no rendezvous
            return None if under_torchrun() and os.environ.get("RANK", "0") != "0" else done
        if under_torchrun():
            return torchrun_worker(cfg, resume)
        if cfg.pipeline.launcher == "ray":
            return _ray_train(cfg, resume)
        spec = checks.preflight(cfg, resume, placement=checks.Placement(profile_in_subprocess=True))
        return _single(spec) if spec.world == 1 else spawning.spawn(spec)
    finally:
        release_run_dir()
        clear_stop()  # a stop request ends this run, never the next one in this process


def _already_complete(cfg: Config, resume: str | Path | None) -> dict[str, Any] | None:
    """The summary of a resumed run that has nothing left to train (None otherwise), from its
    manifest alone."""
    point = resume or (checks.auto_resume_point(cfg) if cfg.run.resume == "auto" else None)
    if not point:
        return None
    ckpt = resolve_checkpoint(point)
    manifest = read_manifest(ckpt)
    checks.check_resume(cfg, manifest)
    epochs, max_steps = cfg.run.epochs, cfg.run.max_steps
    if manifest["epoch"] < epochs and not (max_steps and manifest["step"] >= max_steps):
        return None
    verify_checkpoint(ckpt, manifest["num_blocks"])  # "complete" only if it is intact
    return {"run_dir": str(ckpt.parent.parent), "stopped": "complete",
            "epoch": min(manifest["epoch"], epochs), "step": manifest["step"],
            "checkpoint": str(ckpt)}


def _ray_train(cfg: Config, resume: str | Path | None) -> dict[str, Any]:
    try:
        from pipelocal.launch.ray import ray_train
    except ImportError as exc:
        raise ConfigError(
            f"pipeline.launcher = 'ray' needs Ray ({exc}); install it with "
            "pip install -e \".[ray]\" or use pipeline.launcher = 'spawn'"
        ) from exc
    return ray_train(cfg, resume)


def _engine(spec: RunSpec) -> Engine:
    cfg = spec.cfg
    device = place_stage(stages=1, gpus_per_node=visible_gpus(cfg), nodes=1, local_rank=0,
                         device=cfg.run.device)
    configure_determinism(device, cfg.run.deterministic)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    specs = spec.specs
    engine = Engine(build_blocks(cfg, specs, spec.num_classes, range(len(specs)), device),
                    micro_batches=cfg.pipeline.micro_batches)
    if spec.resume is not None:
        engine.load(spec.resume)
    return engine


def _single(spec: RunSpec) -> dict[str, Any]:
    engine = _engine(spec)
    trainer = build_trainer(spec, LocalPipe(engine, eval_piece=piece_rows(spec.cfg)),
                            where=f"single process on {engine.device}")
    return trainer.fit()


def evaluate_checkpoint(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Test accuracy of the output and of every local classifier of a checkpoint."""
    from pipelocal.data import load_dataset, make_loaders

    ckpt = resolve_checkpoint(path)
    cfg = from_dict(apply_overrides(upgrade_saved_config(read_manifest(ckpt)["config"]),
                                    overrides))
    dataset = load_dataset(cfg.data)
    spec = RunSpec(cfg, tuple(dataset.in_shape), dataset.num_classes, ckpt, resume=ckpt)
    engine = _engine(spec)
    train_loader, test_loader = make_loaders(dataset, cfg.data, cfg.run.seed)
    pipe = LocalPipe(engine, eval_piece=piece_rows(cfg))
    trainer = Trainer(cfg, pipe, spec.specs, train_loader, test_loader, ckpt,
                      metrics=Metrics(None, progress=False))
    return trainer.evaluate()
