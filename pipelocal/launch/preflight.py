"""Before any worker starts: load the data, find the resume point, choose the stage count and
the partition, check every stage's shapes with a dummy batch, open the run directory
(:mod:`pipelocal.launch.run_dir`).

Everything checkable is checked here, in the launching process, so a bad run fails in seconds
with a :class:`~pipelocal.config.ConfigError` and no process, and no run directory, is made.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelocal.checkpoint import (
    CheckpointError,
    read_manifest,
    resolve_checkpoint,
    verify_checkpoint,
)
from pipelocal.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_dict,
    from_dict,
    upgrade_saved_config,
)
from pipelocal.data import load_dataset
from pipelocal.determinism import check_bf16
from pipelocal.device import auto_stages, cpu_threads, place_stage, visible_gpus
from pipelocal.engine import Engine, build_blocks
from pipelocal.launch.run_dir import check_fresh, open_run_dir
from pipelocal.pipeline.balance import balance_partition
from pipelocal.pipeline.faults import FAULT_ENV, check_fault_spec
from pipelocal.pipeline.partition import check_partition, max_stages, stage_ranges
from pipelocal.rules import RULES, check_micro_batches, end_to_end_top
from pipelocal.runspec import Position, RunSpec
from pipelocal.stop import check_not_stopped

__all__ = [
    "Placement",
    "auto_resume_point",
    "check_fits",
    "check_replica_batches",
    "check_resume",
    "choose_stages",
    "dry_run",
    "preflight",
    "profiled_partition",
    "resolve",
    "resume_config",
    "validate",
]

_MATCHING_SECTIONS = ("model", "data", "rule", "optim", "schedule")
# How batches are fed, never which batches: a resumed run may change these (and checkpoints
# written before they existed lack them).
_FEED_ONLY = {("data", "prefetch"), ("data", "on_device")}


def check_resume(cfg: Config, manifest: dict[str, Any]) -> None:
    """A resumed run trains the same model the same way; only pipeline/run plumbing may change."""
    saved, now = upgrade_saved_config(manifest["config"]), config_to_dict(cfg)
    diffs = [
        f"{section}.{key}: checkpoint {saved[section].get(key)!r}, now {value!r}"
        for section in _MATCHING_SECTIONS
        for key, value in now[section].items()
        if (section, key) not in _FEED_ONLY and saved[section].get(key) != value
    ]
    for key in ("seed", "epochs", "precision"):
        if saved["run"].get(key, "fp32") != now["run"][key]:
            was = saved["run"].get(key)
            diffs.append(f"run.{key}: checkpoint {was!r}, now {now['run'][key]!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in\n  " + "\n  ".join(diffs)
            + "\nuse the checkpoint's config (its run directory has config.toml)"
        )


def resume_config(manifest: dict[str, Any], overrides: list[str]) -> Config:
    """The config a resumed run uses: the checkpoint's, with ``overrides`` applied.

    A partition the run chose automatically (profiling) does not bind the resume: it is
    chosen again for the new stage count. An explicit one stays unless overridden. A run
    that ``run.max_steps`` stopped continues (to run.epochs, or to a new max_steps).
    """
    saved = upgrade_saved_config(manifest["config"])
    if manifest.get("partition_auto"):
        saved = _with(saved, "pipeline", "partition", [])
    if 0 < saved["run"].get("max_steps", 0) <= manifest["step"]:  # stopped by it: go on
        saved = _with(saved, "run", "max_steps", 0)
    return from_dict(apply_overrides(saved, overrides))


def _with(data: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    return {**data, section: {**data[section], key: value}}


def auto_resume_point(cfg: Config) -> Path | None:
    """``run.resume = "auto"``: the run directory if it holds a complete checkpoint; None if
    it holds no checkpoint at all. A damaged one is an error (offering what verifies), never a
    reason to start afresh over it."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    try:
        resolve_checkpoint(run_dir)
    except CheckpointError:
        if any((run_dir / "checkpoints").glob("step_*/manifest.json")):
            raise
        return None
    return run_dir


@dataclass(frozen=True)
class Placement:
    """What a launcher knows, before any worker starts, of where its stages will run."""

    gpus: int | None = None
    """GPUs the automatic stage count may use (one stage each); None: this machine's."""
    gpus_per_node: int | None = None
    """GPUs per node the stages are placed on; None: this machine's, whose bfloat16 support is
    then checked too."""
    nodes: int = 1
    """Nodes the stages are spread over; 0: every stage on a node of its own (Ray actors)."""
    note: str = "{auto}"
    """The run's layout note; ``{auto}`` is why the stage count is what it is."""
    profile_in_subprocess: bool = False
    """Profile an automatic partition in a short-lived process, so that a launcher that only
    supervises never holds a CUDA context (hundreds of MiB) on a stage's GPU."""
    check: Callable[[int], None] | None = None
    """The launcher's own check of the stage count (Ray: the cluster's resources)."""


def preflight(cfg: Config, resume: str | Path | None = None, *,
              placement: Placement = Placement(), open_dir: bool = True) -> RunSpec:
    """Everything a launcher does before its workers start, once: :func:`resolve`, then the
    partition (profiled when not given), a dummy batch through the stages and the run
    directory (not opened when ``open_dir`` is false: a dry run). Ctrl-C during it stops
    before any worker starts."""
    spec = resolve(cfg, resume, placement=placement)
    check_not_stopped()
    partition = list(spec.cfg.pipeline.partition) or _profile(spec, placement)
    dry_run(spec, partition)
    check_not_stopped()  # profiling can take a while
    spec = spec.evolve(cfg=spec.cfg.replace(pipeline={"partition": partition}))
    if not open_dir:
        return spec
    run_dir, cfg = open_run_dir(spec.cfg, spec.run_dir if spec.resume else None)
    return spec.evolve(cfg=cfg, run_dir=run_dir)


def resolve(cfg: Config, resume: str | Path | None = None, *,
            placement: Placement = Placement()) -> RunSpec:
    """Load the data, find and verify the resume point, fix the stage count, and check
    everything that needs no partition; the spec's partition is the given one ([n] for one
    stage) or empty (to be profiled), and no run directory is opened yet."""
    dataset = load_dataset(cfg.data)
    spec = RunSpec(cfg, tuple(dataset.in_shape), dataset.num_classes, Path())
    if not resume and cfg.run.resume == "auto":
        resume = auto_resume_point(cfg)
    if resume:
        ckpt = resolve_checkpoint(resume)
        manifest = read_manifest(ckpt)
        check_resume(cfg, manifest)
        verify_checkpoint(ckpt, manifest["num_blocks"])
        spec = spec.evolve(run_dir=ckpt.parent.parent, resume=ckpt,
                           start=Position(manifest["epoch"], manifest["batch"], manifest["step"]))
        check_fits(spec)
    else:
        check_fresh(cfg)
    check_replica_batches(cfg, len(dataset.train))
    stages, why = choose_stages(spec, gpus=placement.gpus)
    spec = spec.evolve(cfg=spec.cfg.replace(pipeline={"stages": stages}),
                       note=placement.note.format(auto=why))
    if placement.check is not None:
        placement.check(spec.world)
    partition = validate(spec, gpus_per_node=placement.gpus_per_node,
                         nodes=placement.nodes or spec.world)
    return spec.evolve(cfg=spec.cfg.replace(pipeline={"partition": partition}),
                       partition_auto=not cfg.pipeline.partition)


def check_replica_batches(cfg: Config, samples: int) -> None:
    """Every replica gets at least one row of every batch (a replica without rows would average
    a gradient it has not got): data.batch_size >= replicas, and so is a short last batch."""
    replicas, batch = cfg.pipeline.replicas, cfg.data.batch_size
    last = samples % batch
    if replicas == 1 or (batch >= replicas and not 0 < last < replicas):
        return
    what = (f"data.batch_size = {batch}" if batch < replicas else
            f"the last batch of each epoch has {last} rows ({samples} samples, data.batch_size "
            f"= {batch})")
    raise ConfigError(
        f"pipeline.replicas = {replicas} but {what}: each replica needs at least one row of "
        "every batch; use fewer replicas, or change data.batch_size or data.train_limit")


def check_fits(spec: RunSpec) -> None:
    """Load the resumed checkpoint into the model the config describes, on the CPU here, so a
    checkpoint of another model (a manifest edited by hand) is a one-line error before any
    worker starts, not a load_state_dict traceback in one of them."""
    assert spec.resume is not None
    cfg, specs = spec.cfg, spec.specs
    with warnings.catch_warnings():  # a GPU run's generator state reseeded here: irrelevant
        warnings.simplefilter("ignore")
        Engine(build_blocks(cfg, specs, spec.num_classes, range(len(specs)), "cpu")).load(
            spec.resume)


def choose_stages(spec: RunSpec, *, gpus: int | None = None) -> tuple[int, str]:
    """``pipeline.stages`` (0 = automatic: one per GPU, 2 on CPU) and why."""
    cfg = spec.cfg
    return auto_stages(
        requested=cfg.pipeline.stages,
        partition=len(cfg.pipeline.partition),
        # Each replica has its own stages: one per GPU of its share.
        gpus=(visible_gpus(cfg) if gpus is None else gpus) // cfg.pipeline.replicas,
        num_blocks=_stage_units(cfg, len(spec.specs)),
        is_global=RULES.get(cfg.rule.name).is_global,
    )


def _stage_units(cfg: Config, num_blocks: int) -> int:
    """The most stages the model can run as: end-to-end top blocks share one stage."""
    if RULES.get(cfg.rule.name).is_global:
        return num_blocks
    return max_stages(num_blocks, end_to_end_top(cfg.rule, num_blocks))


def _top_reason(cfg: Config, top: range) -> str:
    return (f"learn end to end from the output loss (rule.name = {cfg.rule.name!r}, "
            f"rule.top_layers = {cfg.rule.top_layers!r}: the top rule.aux_depth + 1 = "
            f"{len(top)} blocks; rule.top_layers = 'local' gives each its own auxiliary net)")


def validate(spec: RunSpec, *, gpus_per_node: int | None = None, nodes: int = 1) -> list[int]:
    """Everything checkable before a worker starts; returns the partition (explicit or [n])."""
    cfg, specs = spec.cfg, spec.specs
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
    top = end_to_end_top(cfg.rule, len(specs))
    if not rule.is_global and stages > max_stages(len(specs), top):
        raise ConfigError(
            f"pipeline.stages = {stages} but blocks {names[top.start]}..{names[-1]} of model "
            f"{cfg.model.name} {_top_reason(cfg, top)} and share one stage, so its "
            f"{len(specs)} blocks form at most {max_stages(len(specs), top)} stages; use at "
            f"most {max_stages(len(specs), top)} stages"
        )
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard = true needs the tensorboard package (not "
                          "installed): pip install tensorboard, or set run.tensorboard = false")
    check_fault_spec(os.environ.get(FAULT_ENV, ""), stages, cfg.pipeline.replicas)
    check_micro_batches(cfg)
    partition = list(cfg.pipeline.partition) or ([len(specs)] if stages == 1 else [])
    if partition:
        together = range(0) if rule.is_global else top
        check_partition(partition, names, together=together, why=_top_reason(cfg, top))
    gpus = visible_gpus(cfg) if gpus_per_node is None else gpus_per_node
    world = spec.world
    if cfg.pipeline.replicas > 1 and cfg.run.device != "cpu" and gpus \
            and world > gpus * nodes:
        raise ConfigError(
            f"pipeline.replicas x pipeline.stages = {cfg.pipeline.replicas} x {stages} = "
            f"{world} ranks but only {gpus * nodes} GPU(s) are visible ({nodes} node(s) x "
            f"{gpus}); each rank needs a GPU of its own (NCCL cannot put two ranks on one "
            "device): use fewer replicas or stages, or run.device = 'cpu'")
    for local_rank in range(min(world, max(gpus, 1))):  # raises if the ranks do not fit
        device = place_stage(stages=world, gpus_per_node=gpus, nodes=nodes,
                             local_rank=local_rank, device=cfg.run.device)
        if gpus_per_node is None:  # this machine's GPUs: ask whether they have bfloat16
            check_bf16(device, cfg.run.precision)
    return partition


def dry_run(spec: RunSpec, partition: list[int]) -> None:
    """Run a dummy batch stage by stage and check each stage gets the shape it expects."""
    cfg, specs = spec.cfg, spec.specs
    blocks = build_blocks(cfg, specs, spec.num_classes, range(len(specs)), "cpu")
    x = torch.zeros((2, *spec.in_shape))
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


def profiled_partition(spec: RunSpec, device: torch.device) -> list[int]:
    """The balanced partition from profiling every block on ``device`` as a stage runs it."""
    cfg = spec.cfg
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(cfg.pipeline.threads_per_stage, spec.world))
    try:
        return balance_partition(cfg, spec.specs, spec.num_classes, device).partition
    finally:
        torch.set_num_threads(threads)


def _profile(spec: RunSpec, placement: Placement) -> list[int]:
    """The automatic partition, profiled on the device stage 0 runs on."""
    cfg = spec.cfg
    gpus = visible_gpus(cfg)
    device = place_stage(stages=cfg.pipeline.stages, gpus_per_node=gpus, nodes=1,
                         local_rank=0, device=cfg.run.device) if gpus else torch.device("cpu")
    if placement.profile_in_subprocess and device.type == "cuda":
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(profiled_partition, spec, device).result()
    return profiled_partition(spec, device)
