"""Setting up a training run: data, model, run directory, resume point, validation.

``train(cfg)`` is what ``pipelocal train`` calls. It validates everything it can before any
worker starts, then runs the single-process engine (``pipeline.stages = 1``) or the pipeline
(:mod:`pipelocal.pipeline.launch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelocal.checkpoint import read_manifest, resolve_checkpoint
from pipelocal.config import Config, ConfigError, config_to_dict, to_toml
from pipelocal.data import Dataset, load_dataset, make_loaders
from pipelocal.engine import Engine, LocalPipe, build_blocks
from pipelocal.metrics import Metrics
from pipelocal.models import BlockSpec, build_model
from pipelocal.pipeline.partition import check_partition, stage_ranges
from pipelocal.rules import RULES
from pipelocal.trainer import Position, Trainer

__all__ = [
    "Setup",
    "check_resume",
    "dry_run",
    "make_run_dir",
    "open_run_dir",
    "prepare",
    "resolve_device",
    "resolve_stages",
    "train",
    "validate",
]

_MATCHING_SECTIONS = ("model", "data", "rule", "optim", "schedule")
# How batches are fed, never which batches: a resumed run may change these (and checkpoints
# written before they existed lack them).
_FEED_ONLY = {("data", "prefetch"), ("data", "on_device")}


@dataclass
class Setup:
    """What every process of a run agrees on before training starts."""

    cfg: Config
    in_shape: tuple[int, ...]
    num_classes: int
    run_dir: Path
    resume: Path | None = None
    start: Position = field(default_factory=Position)

    @property
    def specs(self) -> list[BlockSpec]:
        return build_model(self.cfg.model, self.in_shape, self.num_classes)


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_resume(cfg: Config, manifest: dict[str, Any]) -> None:
    """A resumed run trains the same model the same way; only pipeline/run plumbing may change."""
    saved, now = manifest["config"], config_to_dict(cfg)
    diffs = [
        f"{section}.{key}: checkpoint {saved[section].get(key)!r}, now {value!r}"
        for section in _MATCHING_SECTIONS
        for key, value in now[section].items()
        if (section, key) not in _FEED_ONLY and saved[section].get(key) != value
    ]
    for key in ("seed", "epochs"):
        if saved["run"][key] != now["run"][key]:
            diffs.append(f"run.{key}: checkpoint {saved['run'][key]!r}, now {now['run'][key]!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in\n  " + "\n  ".join(diffs)
            + "\nuse the checkpoint's config (its run directory has config.toml)"
        )


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir) / name
    suffix = 1
    while (run_dir / "metrics.jsonl").exists() and not cfg.run.name:
        run_dir = Path(cfg.run.out_dir) / f"{name}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare(cfg: Config, resume: str | Path | None = None) -> tuple[Setup, Dataset]:
    """Load the data and find the resume point (the run directory is opened after validation)."""
    dataset = load_dataset(cfg.data)
    setup = Setup(cfg, tuple(dataset.in_shape), dataset.num_classes, Path())
    if resume:
        ckpt = resolve_checkpoint(resume)
        manifest = read_manifest(ckpt)
        check_resume(cfg, manifest)
        setup.run_dir, setup.resume = ckpt.parent.parent, ckpt
        setup.start = Position(manifest["epoch"], manifest["batch"], manifest["step"])
    return setup, dataset


def open_run_dir(setup: Setup) -> None:
    """Create the run directory (a resumed run keeps its own) and write the resolved config."""
    if setup.resume is None:
        setup.run_dir = make_run_dir(setup.cfg)
    (setup.run_dir / "config.toml").write_text(to_toml(setup.cfg))


def resolve_stages(cfg: Config, num_blocks: int) -> Config:
    """``pipeline.stages = 0``: len(partition) if given, else one per GPU or 2 on CPU."""
    if cfg.pipeline.stages:
        return cfg
    if cfg.pipeline.partition:
        stages = len(cfg.pipeline.partition)
    elif RULES.get(cfg.rule.name).is_global:
        stages = 1  # backprop baselines cannot be pipelined
    else:
        gpus = torch.cuda.device_count() if cfg.run.device != "cpu" else 0
        stages = min(max(gpus, 2), num_blocks)
    return cfg.replace(pipeline={"stages": stages})


def validate(setup: Setup) -> list[int]:
    """Everything checkable before a worker starts; returns the partition (explicit or [n])."""
    cfg, specs = setup.cfg, setup.specs
    names = [s.name for s in specs]
    stages = cfg.pipeline.stages
    rule = RULES.get(cfg.rule.name)
    if stages > 1 and rule.is_global:
        raise ConfigError(
            f"rule.name = {cfg.rule.name!r} backpropagates through the whole model, so it cannot "
            f"run as a pipeline (pipeline.stages = {stages}); use pipeline.stages = 1, or a local "
            "rule such as predsim"
        )
    if stages > len(specs):
        raise ConfigError(
            f"pipeline.stages = {stages} but model {cfg.model.name} has only {len(specs)} blocks "
            f"({', '.join(names)}); use at most {len(specs)} stages"
        )
    partition = list(cfg.pipeline.partition) or ([len(specs)] if stages == 1 else [])
    if partition:
        check_partition(partition, names)
    resolve_device(cfg)
    return partition


def dry_run(setup: Setup, partition: list[int]) -> None:
    """Run a dummy batch stage by stage and check each stage gets the shape it expects."""
    cfg, specs = setup.cfg, setup.specs
    blocks = build_blocks(cfg, specs, setup.num_classes, range(len(specs)), "cpu")
    x = torch.zeros((2, *setup.in_shape))
    sender = "the data loader"
    for s, r in enumerate(stage_ranges(partition)):
        want = (2, *specs[r.start].in_shape)
        if tuple(x.shape) != want:
            raise ConfigError(
                f"stage {s} expects input {list(want)} but {sender} sends {list(x.shape)}; "
                "check the partition, model.input_shape and the dataset "
                "(sizes shown for a batch of 2)"
            )
        for i in r:
            try:
                x, _ = blocks[i].eval_step(x)
            except RuntimeError as exc:
                raise ConfigError(
                    f"block {specs[i].name} (stage {s}) fails on input {list(x.shape)}: {exc}"
                ) from exc
        sender = f"stage {s}"


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train as configured: one process, a spawned pipeline, or this rank of a torchrun job."""
    from pipelocal.pipeline import launch

    if launch.under_torchrun():
        return launch.torchrun_worker(cfg, resume)
    setup, dataset = prepare(cfg, resume)
    setup.cfg = cfg = resolve_stages(cfg, len(setup.specs))
    partition = validate(setup)
    if cfg.pipeline.stages == 1:
        dry_run(setup, partition)
        open_run_dir(setup)
        return train_single(setup, dataset)
    del dataset  # rank 0 loads its own copy
    return launch.spawn(setup, partition)


def train_single(setup: Setup, dataset: Dataset) -> dict[str, Any]:
    cfg = setup.cfg
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg)
    specs = setup.specs
    blocks = build_blocks(cfg, specs, dataset.num_classes, range(len(specs)), device)
    engine = Engine(blocks)
    if setup.resume is not None:
        engine.load(setup.resume)
    train_loader, test_loader = make_loaders(dataset, cfg.data, cfg.run.seed)
    metrics = Metrics(setup.run_dir, progress=cfg.run.progress)
    metrics.echo(
        f"pipelocal: {cfg.model.name} ({len(specs)} blocks) with rule {cfg.rule.name} on "
        f"{dataset.name}, single process on {device}; run directory {setup.run_dir}"
    )
    trainer = Trainer(cfg, LocalPipe(engine), specs, train_loader, test_loader, setup.run_dir,
                      metrics=metrics, start=setup.start)
    return trainer.fit()
