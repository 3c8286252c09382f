"""The typed config tree: frozen dataclasses, loaded from TOML, overridden from the CLI.

Precedence: ``--set section.key=value`` on the command line > the TOML file > the defaults below.
Every impossible value or unknown key fails here, before any data is loaded or any worker
starts, with a :class:`ConfigError` that names the key, the value and what is accepted.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pipelocal.registry import Registry

__all__ = [
    "AUGMENTATIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RayConfig",
    "RuleConfig",
    "RunConfig",
    "ScheduleConfig",
    "apply_overrides",
    "config_help",
    "config_to_dict",
    "load_config",
    "upgrade_saved_config",
]


AUGMENTATIONS = ("jitter", "flip", "padcrop", "cutout")
"""Names accepted in ``data.augment``, in the order they are applied (pipelocal.data.augment)."""


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and what is accepted."""


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid; accepted: {accepted}")


def _check_name(key: str, value: str, available: list[str]) -> None:
    _check(value in available, key, value, "one of " + ", ".join(available))


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    name: str = "mlp"
    """Registered model name (``pipelocal models`` lists them)."""
    width: float = 1.0
    """Channel multiplier for the VGG models: 2.0 and 3.0 give the paper's (2x)/(3x) variants."""
    hidden: int = 256
    """MLP: units per hidden layer (the paper's 3x1024 is hidden = 1024, depth = 3)."""
    depth: int = 3
    """MLP: number of hidden layers (each one a locally trained block)."""
    fc_width: int = 1024
    """VGG: width of the hidden fully connected layer (fc1024 in the paper)."""
    dropout: float = 0.0
    """Dropout probability on every hidden block's output."""
    conv_dropout: Literal["channel", "element"] = "channel"
    """How conv blocks drop: whole feature maps (``nn.Dropout2d``, the authors' code) or single
    values (``nn.Dropout``); fc blocks always drop single values."""
    input_dropout: float = 0.0
    """mostafa-cnn5: dropout on the input images (the paper: "after the input layer")."""
    nonlin: Literal["relu", "leaky_relu"] = "relu"
    batchnorm: bool = True
    """BatchNorm after each hidden layer (conv3x3-BN-nonlin in the paper)."""
    input_shape: tuple[int, ...] = ()
    """Input shape (C, H, W) the model is built for; empty = taken from the dataset."""
    init: Literal["auto", "pytorch", "he-normal"] = "auto"
    """Weight initialisation: pytorch = PyTorch's defaults (and the output layer's weight at
    zero under a local rule with rule.zero_init); he-normal = every conv of the blocks and the
    auxiliary nets from normal(0, sqrt(2 / (k^2 C_out))), linear layers at PyTorch's default;
    auto = the rule's authors' choice (he-normal for auglocal, dgl, infopro; else pytorch)."""

    def __post_init__(self) -> None:
        _check_name("model.name", self.name, Registry.of("model").names())
        _check(self.width > 0, "model.width", self.width, "a multiplier > 0")
        _check(self.hidden >= 1, "model.hidden", self.hidden, "an integer >= 1")
        _check(self.depth >= 1, "model.depth", self.depth, "an integer >= 1")
        _check(self.fc_width >= 1, "model.fc_width", self.fc_width, "an integer >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "0 <= p < 1")
        _check(self.conv_dropout in ("channel", "element"), "model.conv_dropout",
               self.conv_dropout, "channel, element")
        _check(0.0 <= self.input_dropout < 1.0, "model.input_dropout", self.input_dropout,
               "0 <= p < 1")
        _check(
            self.nonlin in ("relu", "leaky_relu"), "model.nonlin", self.nonlin, "relu, leaky_relu"
        )
        _check(self.init in ("auto", "pytorch", "he-normal"), "model.init", self.init,
               "auto, pytorch, he-normal")
        _check(
            len(self.input_shape) in (0, 3) and all(d > 0 for d in self.input_shape),
            "model.input_shape",
            self.input_shape,
            "[] (from the dataset) or [C, H, W] with positive sizes",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    name: str = "digits"
    """Registered dataset; ``digits`` is embedded (no download)."""
    data_dir: str = "data"
    """Root folder the torchvision datasets are read from."""
    download: bool = False
    """Let torchvision download a missing dataset into ``data_dir`` (needs internet)."""
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: tuple[str, ...] = ()
    """Any of jitter, flip, padcrop, cutout, applied in that order to training batches."""
    jitter_px: int = 2
    """jitter: random translation of up to this many pixels (zero fill)."""
    pad_px: int = 4
    """padcrop: padding before the random crop back to the input size."""
    pad_mode: Literal["zeros", "reflect"] = "zeros"
    """padcrop: how the border is filled: zeros (torchvision's RandomCrop(padding=...)) or
    reflect (mirrored, without repeating the edge pixel: the AugLocal authors' CIFAR-10)."""
    cutout_px: int = 16
    """cutout: side of the zeroed square."""
    classes_per_batch: int = 0
    """If > 0, each training batch holds at most this many classes ..."""
    classes_per_batch_until_epoch: int = 0
    """... for epochs before this one (0 = for all epochs)."""
    train_limit: int = 0
    """If > 0, use only the first N training samples (quick experiments)."""
    prefetch: int = 2
    """Training batches a background thread builds ahead of use (pinned for a CUDA device);
    0 = build each batch on the training thread when it is needed. Batches are identical."""
    on_device: bool = False
    """Keep the training split as uint8 on the run's CUDA device and build batches (gather,
    augmentation, normalisation) there; on CPU this changes nothing."""

    def __post_init__(self) -> None:
        _check_name("data.name", self.name, Registry.of("dataset").names())
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, ">= 1"
        )
        _check(self.pad_mode in ("zeros", "reflect"), "data.pad_mode", self.pad_mode,
               "zeros, reflect")
        for aug in self.augment:
            _check(
                aug in AUGMENTATIONS, "data.augment", self.augment, ", ".join(AUGMENTATIONS)
            )
        for key in ("jitter_px", "pad_px", "cutout_px", "classes_per_batch", "train_limit",
                    "prefetch"):
            value = getattr(self, key)
            _check(value >= 0, f"data.{key}", value, "an integer >= 0")
        _check(
            self.classes_per_batch_until_epoch >= 0,
            "data.classes_per_batch_until_epoch",
            self.classes_per_batch_until_epoch,
            "an integer >= 0",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleConfig:
    name: str = "predsim"
    """Registered local learning rule (``pipelocal rules`` lists them)."""
    beta: float = 0.99
    """predsim: loss = (1 - beta) * pred + beta * sim."""
    dim_in_decoder: int = 4096
    """pred: the activation is average-pooled until C*H*W <= this before the linear classifier
    (the authors' default 4096)."""
    target_proj_size: int = 128
    """bpf: size of the fixed random projection of the one-hot labels."""
    aux_depth: int = 2
    """auglocal: d, the most later layers copied into a hidden block's auxiliary net (each aux
    net is these copies + global average pool + linear; the paper's d also counts the linear
    classifier, so its d = aux_depth + 1)."""
    pyramid_tau: float = 0.5
    """auglocal: decay factor tau of the pyramidal depth d_j (0 = depth d for every block)."""
    top_layers: Literal["backprop", "local"] = "backprop"
    """auglocal: backprop = the last aux_depth + 1 layers and the classifier train end to end
    from the output loss, and only the layers below them have auxiliary nets (the authors'
    code, ``local_module_num -= aux_net_depth``); these top layers run in one pipeline stage.
    local = every hidden layer has its own auxiliary net (the paper's text: 16 / 55 local
    layers on ResNet-32 / 110)."""
    aux_feature_dim: int = 128
    """infopro: hidden fully connected units of the auxiliary classifier (conv-AP-128FC-FC)."""
    infopro_recon: tuple[float, ...] = (5.0, 0.2)
    """infopro: reconstruction-loss weight (lambda_1) at the first and the last hidden block,
    linearly interpolated between them (the AugLocal authors' ResNet-32 values)."""
    infopro_ce: tuple[float, ...] = (0.05, 0.5)
    """infopro: cross-entropy weight (lambda_2) at the first and the last hidden block."""
    infopro_target: Literal["dataset", "minmax"] = "dataset"
    """infopro: the image the decoder reconstructs: dataset = the input un-normalised with the
    dataset's mean and std (the authors); minmax = each sample and channel rescaled to [0, 1]
    by its own minimum and maximum."""
    similarity_std: bool = True
    """sim: per-channel standard deviation of conv maps with H > 1 in the similarity matrix;
    false = the authors' ``--no-similarity-std`` (flatten)."""
    zero_init: bool = True
    """pred: local classifier weights (bpf: and bias) start at zero, and, with model.init =
    pytorch, so does the output layer's weight under a local rule, as in the authors' code;
    false = PyTorch's default."""
    scale_output_loss: bool = True
    """predsim(-bpf): the output layer's cross-entropy is scaled by (1 - beta), as the authors."""
    classifier_loss: Literal["ce", "hinge"] = "ce"
    """sym/scfb/tlc: the fixed random classifier's loss: cross-entropy or square hinge."""
    classifier_init: Literal["uniform", "gaussian"] = "uniform"
    """sym/scfb/tlc: distribution of the classifier (and feedback) weights, zero mean and
    std sqrt(2 / (fan_in + fan_out)) (Mostafa et al. 2018, eq. 7; gaussian = their GI)."""
    micro_batch_similarity: bool = False
    """sim, predsim, their bpf variants, glob+sim with pipeline.micro_batches > 1: true = the
    similarity matrix of each micro-batch alone (a different loss from the whole batch's);
    false = such a run is refused."""

    def __post_init__(self) -> None:
        _check_name("rule.name", self.name, Registry.of("rule").names())
        _check(self.aux_depth >= 1, "rule.aux_depth", self.aux_depth, "an integer >= 1")
        _check(0.0 <= self.pyramid_tau <= 1.0, "rule.pyramid_tau", self.pyramid_tau,
               "0 <= tau <= 1")
        _check(self.top_layers in ("backprop", "local"), "rule.top_layers", self.top_layers,
               "backprop, local")
        _check(self.aux_feature_dim >= 1, "rule.aux_feature_dim", self.aux_feature_dim, ">= 1")
        for key in ("infopro_recon", "infopro_ce"):
            value = getattr(self, key)
            _check(len(value) == 2 and min(value) >= 0, f"rule.{key}", value,
                   "[first, last]: two weights >= 0")
        _check(self.infopro_target in ("dataset", "minmax"), "rule.infopro_target",
               self.infopro_target, "dataset, minmax")
        _check(0.0 <= self.beta <= 1.0, "rule.beta", self.beta, "0 <= beta <= 1")
        _check(self.dim_in_decoder >= 1, "rule.dim_in_decoder", self.dim_in_decoder, ">= 1")
        _check(
            self.target_proj_size >= 1, "rule.target_proj_size", self.target_proj_size, ">= 1"
        )
        _check(self.classifier_loss in ("ce", "hinge"), "rule.classifier_loss",
               self.classifier_loss, "ce, hinge")
        _check(self.classifier_init in ("uniform", "gaussian"), "rule.classifier_init",
               self.classifier_init, "uniform, gaussian")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"
    """Each block has its own optimiser of this kind."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.0
    """sgd only; 0 as the authors' ``train.py`` (Mostafa et al.: 0.9 with nesterov)."""
    nesterov: bool = False
    """sgd only; needs momentum > 0."""

    def __post_init__(self) -> None:
        _check(self.name in ("adam", "sgd"), "optim.name", self.name, "adam, sgd")
        _check(self.lr > 0, "optim.lr", self.lr, "a learning rate > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "0 <= momentum < 1")
        _check(not self.nesterov or self.momentum > 0, "optim.nesterov", self.nesterov,
               "false, or true together with optim.momentum > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    name: Literal["step", "cosine", "constant"] = "step"
    """step: lr x gamma at each milestone; cosine: to 0 at the end."""
    milestones: tuple[float, ...] = (0.5, 0.75, 0.89, 0.94)
    """step: milestones as fractions of training (the paper's 50/75/89/94%); ignored when
    ``milestone_epochs`` is set."""
    milestone_epochs: tuple[int, ...] = ()
    """step: milestones as epochs, as the authors' ``--lr-decay-milestones``: the factor of
    (0-based) epoch e is gamma ** (number of milestones <= e), i.e. bisect_right."""
    gamma: float = 0.25
    warmup_epochs: int = 0
    """cosine: epochs of linear warm-up before the cosine (the AugLocal authors: 10), with the
    authors' formula: epochs count e = 1..E, cos(e) = optim.lr / 2 (1 + cos(pi e / E)), epoch
    e <= W = warmup_epochs trains at cos(e) (e - 1) / W + warmup_start_lr (W + 1 - e) / W, later
    epochs at cos(e), so the last epoch trains at lr 0; 0 = no warm-up (cosine over e = 0..E-1,
    starting at optim.lr)."""
    warmup_start_lr: float = 0.01
    """cosine with warm-up: the learning rate of the first epoch (absolute, not a factor)."""

    def __post_init__(self) -> None:
        _check(
            self.name in ("step", "cosine", "constant"),
            "schedule.name",
            self.name,
            "step, cosine, constant",
        )
        _check(
            all(0 < m < 1 for m in self.milestones)
            and list(self.milestones) == sorted(self.milestones),
            "schedule.milestones",
            self.milestones,
            "increasing fractions of training in (0, 1)",
        )
        _check(
            all(m >= 1 for m in self.milestone_epochs)
            and list(self.milestone_epochs) == sorted(self.milestone_epochs),
            "schedule.milestone_epochs",
            self.milestone_epochs,
            "increasing epochs >= 1 (e.g. [200, 300, 350, 375]), or [] to use the fractions "
            "in schedule.milestones",
        )
        _check(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "0 < gamma <= 1")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs,
               "an integer >= 0 (0 = no warm-up)")
        _check(self.warmup_epochs == 0 or self.name == "cosine", "schedule.warmup_epochs",
               self.warmup_epochs, f"0 with schedule.name = {self.name!r}: the warm-up leads "
               "into the cosine schedule (set schedule.name = \"cosine\")")
        _check(self.warmup_start_lr >= 0, "schedule.warmup_start_lr", self.warmup_start_lr,
               "a learning rate >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    stages: int = 0
    """Worker processes, one per contiguous group of blocks; 1 = the single-process engine;
    0 = automatic: one per GPU, or 2 on CPU (at most one per block; len(partition) if given)."""
    replicas: int = 1
    """Data-parallel copies of the pipeline: replicas x stages worker ranks, rank = replica *
    stages + stage; data.batch_size stays the global batch, each replica trains on its slice
    and the replicas of a stage average their gradients (docs/architecture.md#replicas)."""
    partition: tuple[int, ...] = ()
    """Blocks per stage, e.g. [3, 2, 3]; empty = balanced by profiling (``pipelocal plan``)."""
    channel_depth: int = 2
    """Messages in flight between two stages (bounds memory and how far a fast stage runs ahead)."""
    micro_batches: int = 1
    """Every block trains on each batch in this many micro-batches (as even as rows allow; at
    most one per row), accumulating row-weighted gradients, one optimiser step per batch; a
    pipeline stage sends each micro-batch on as soon as it is done. Batch statistics (BN) see
    micro-batches; rules whose loss couples the samples of a batch (sim, predsim, ...) refuse
    M > 1 unless rule.micro_batch_similarity = true."""
    wire_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of activations on the wire; auto = follow run.precision (bf16 -> bfloat16). With
    run.precision = fp32, bfloat16 halves traffic but breaks bitwise exactness."""
    threads_per_stage: int = 0
    """torch threads in each stage process; 0 = CPU cores // stages (at least 1)."""
    bind_cpus: bool = True
    """On CPU, bind each stage process to cores of its own (threads_per_stage of the cores this
    process may use, in local-rank order), so that the kernel does not move a stage between
    cores; not bound where the node's stages have more threads than it has cores, or under
    Ray, which places its actors itself. A bound stage cannot move away from another busy
    process on its cores: set false on a machine shared with other work."""
    ideal_steps: int = 0
    """Benchmarking: after each training epoch, every stage trains this many more steps on a
    copy of its last batch, all stages at once and without communication, then gets back its
    exact training state; the mean step time after the first is ``stage{k}/ideal_step(s)`` in
    metrics.jsonl: the concurrent ideal the epoch's throughput compares with, measured in the
    stage processes themselves. Outside the epoch's time; the steps must fit in
    pipeline.timeout_s, which bounds the gather after them; 0 = off; one replica only."""
    timeout_s: float = 120.0
    """Longest any blocking wait (receive, send, collective) may take before the run fails."""
    memory_cap_gib: float = 0.0
    """plan / automatic partition: per-stage memory cap in GiB (0 = none)."""
    launcher: Literal["spawn", "ray"] = "spawn"
    """Where the stages run: spawn = processes started here; ray = Ray actors (section [ray]);
    ``pipelocal train --launcher`` sets it. Under torchrun, torchrun's processes are the stages."""

    def __post_init__(self) -> None:
        _check(self.stages >= 0, "pipeline.stages", self.stages, "an integer >= 0 (0 = auto)")
        _check(self.replicas >= 1, "pipeline.replicas", self.replicas, "an integer >= 1")
        _check(
            all(n >= 1 for n in self.partition),
            "pipeline.partition",
            self.partition,
            "a list of block counts >= 1, one per stage",
        )
        _check(
            not self.partition or self.stages in (0, len(self.partition)),
            "pipeline.partition",
            self.partition,
            f"one block count per stage ({self.stages} entries for pipeline.stages = "
            f"{self.stages}), or [] for an automatic partition",
        )
        _check(self.channel_depth >= 1, "pipeline.channel_depth", self.channel_depth, ">= 1")
        _check(self.micro_batches >= 1, "pipeline.micro_batches", self.micro_batches,
               "an integer >= 1 (1 = the whole batch at once)")
        _check(
            self.wire_dtype in ("auto", "float32", "bfloat16"),
            "pipeline.wire_dtype",
            self.wire_dtype,
            "auto, float32, bfloat16",
        )
        _check(self.threads_per_stage >= 0, "pipeline.threads_per_stage", self.threads_per_stage,
               "an integer >= 0")
        _check(self.ideal_steps == 0 or self.ideal_steps >= 2, "pipeline.ideal_steps",
               self.ideal_steps, "0 (off) or an integer >= 2 (the first step is a warm-up)")
        _check(self.ideal_steps == 0 or self.replicas == 1, "pipeline.ideal_steps",
               self.ideal_steps, "0 with pipeline.replicas > 1 (each replica's stage would "
               "average its extra steps' gradients with the others')")
        # Below a second, process-group set-up itself times out (in C++, with a long traceback).
        _check(self.timeout_s >= 1, "pipeline.timeout_s", self.timeout_s, "seconds >= 1")
        _check(self.memory_cap_gib >= 0, "pipeline.memory_cap_gib", self.memory_cap_gib, ">= 0")
        _check(self.launcher in ("spawn", "ray"), "pipeline.launcher", self.launcher,
               "spawn, ray")


@dataclass(frozen=True, kw_only=True, slots=True)
class RayConfig:
    """The Ray launcher (``pipeline.launcher = "ray"``): one actor per stage."""

    address: str = ""
    """Cluster to join: "" = $RAY_ADDRESS if set, else start a local Ray instance; "auto" = the
    running cluster on this machine; or a GCS address such as "10.0.0.1:6379"."""
    cpus_per_stage: float = 1.0
    """CPUs Ray reserves for each stage actor (also its torch threads when
    pipeline.threads_per_stage = 0)."""
    gpus_per_stage: int = -1
    """GPUs per stage actor: 1 or 0; -1 = 1 if the cluster has GPUs and run.device is not cpu."""
    placement: Literal["pack", "spread"] = "pack"
    """Placement group strategy: pack = as few nodes as possible; spread = one stage per node
    where possible."""

    def __post_init__(self) -> None:
        _check(self.cpus_per_stage > 0, "ray.cpus_per_stage", self.cpus_per_stage, "a number > 0")
        _check(self.gpus_per_stage in (-1, 0, 1), "ray.gpus_per_stage", self.gpus_per_stage,
               "-1 (auto), 0 or 1: a stage uses one device, and NCCL cannot share a GPU "
               "between two ranks")
        _check(self.placement in ("pack", "spread"), "ray.placement", self.placement,
               "pack, spread")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    epochs: int = 15
    seed: int = 0
    out_dir: str = "runs"
    """Run directories are created below this folder."""
    name: str = ""
    """Run directory name (one folder below run.out_dir); empty = a time stamp. One run at a
    time owns a run directory: a second run with the same name is refused while it runs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 1
    """torch threads of the single-process engine; 0 = torch's default (one per core). 1 by
    default: where other processes hold cores, more threads spin-wait for them and the engine
    runs several times slower than with one."""
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (and always at the end and on Ctrl-C)."""
    max_steps: int = 0
    """If > 0, stop (with a checkpoint) after this many training steps in total."""
    progress: bool = True
    """Show a progress bar on stderr."""
    deterministic: bool = True
    """Deterministic kernels (cuBLAS workspace, deterministic algorithms, cuDNN deterministic,
    no cuDNN benchmark). Off: cuDNN benchmarks for speed and bitwise exactness holds on CPU only."""
    resume: Literal["never", "auto", "overwrite"] = "never"
    """What a new run does with a run directory (run.name) that holds a run. never: refuse it
    (continue it with --resume, or choose another run.name). auto: continue from its latest
    complete checkpoint, as a restarted job must (torchrun --max-restarts, a Slurm requeue);
    start afresh if it has none. overwrite (= --overwrite): delete what it holds and start
    afresh."""
    allow_nonfinite: bool = False
    """Keep training when a block's loss is NaN or Inf (checked once per epoch, where the
    statistics are read anyway); off: the run stops before checkpointing the damaged state."""
    tensorboard: bool = False
    """Also log the epoch metrics to TensorBoard (run directory/tb; needs the tensorboard
    package)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast the blocks and their heads to bfloat16 (weights and optimiser state stay
    float32); also on CPU."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "run.epochs", self.epochs, "an integer >= 1")
        _check(self.precision in ("fp32", "bf16"), "run.precision", self.precision, "fp32, bf16")
        _check(self.resume in ("never", "auto", "overwrite"), "run.resume", self.resume,
               "never, auto, overwrite")
        _check(self.resume == "never" or bool(self.name), "run.resume", self.resume,
               "auto or overwrite only with a run.name (the directory a restarted job comes "
               "back to, or the one to replace)")
        _check(self.device in ("auto", "cpu", "cuda"), "run.device", self.device,
               "auto, cpu, cuda")
        _check(self.threads >= 0, "run.threads", self.threads, "an integer >= 0")
        _check(self.checkpoint_every >= 1, "run.checkpoint_every", self.checkpoint_every, ">= 1")
        _check(self.max_steps >= 0, "run.max_steps", self.max_steps, "an integer >= 0")
        _check(self.name == "" or (Path(self.name).name == self.name and self.name not in
                                   (".", "..")), "run.name", self.name,
               "a folder name without '/' or '..' (the run directory is run.out_dir/run.name)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections or ``section={key: value}`` dicts replaced."""
        return from_dict(_merge(config_to_dict(self), sections))


# --------------------------------------------------------------------------- loading


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), the form written to TOML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value), key, value, "a finite number")
        return float(value)
    if hint is str and not isinstance(value, str) and not isinstance(value, (list, dict)):
        # ``--set run.name=123`` / ``=nan`` / ``=true``: a string key takes the literal text.
        return _literal_text(value)
    if hint is str or origin is Literal:
        _check(isinstance(value, str), key, value, "a string")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, value, "a list")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(key, v, item) for v in value)
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - not used yet
        return value
    raise AssertionError(f"unhandled config type {hint} for {key}")


def _literal_text(value: Any) -> str:
    """The text a TOML scalar was written as on the command line (``true``, ``123``, ``nan``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


_ADDED_SINCE = {
    # (section, key): the value that reproduces how a config written without the key trained
    ("rule", "top_layers"): "local",  # an auxiliary net on every hidden block
    ("rule", "infopro_target"): "minmax",
    ("model", "init"): "pytorch",
    ("data", "pad_mode"): "zeros",
    ("schedule", "warmup_epochs"): 0,
    ("schedule", "warmup_start_lr"): 0.01,  # unused without a warm-up
    ("pipeline", "micro_batches"): 1,  # the whole batch at once
    ("rule", "micro_batch_similarity"): False,  # unused with one micro-batch
}
"""Keys added to the config tree after checkpoints were written without them, and what those
checkpoints trained with (the new defaults follow the papers' authors instead)."""


def upgrade_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config read from a checkpoint, with every key added since filled in with the value it
    trained with, so that resuming or evaluating it changes nothing. A config written before
    ``data.pad_mode`` existed also predates ``svhn`` meaning the split train only: its
    ``svhn`` was train + extra, now ``svhn-extra``."""
    out = {section: dict(values) if isinstance(values, dict) else values
           for section, values in data.items()}
    if "pad_mode" not in out.get("data", {}) and out.get("data", {}).get("name") == "svhn":
        out["data"]["name"] = "svhn-extra"
    for (section, key), value in _ADDED_SINCE.items():
        out.setdefault(section, {}).setdefault(key, value)
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict; unknown keys are errors."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name in data:
        _check(name in sections, name, data[name], "sections " + ", ".join(sections))
    built = {}
    for name, sec_field in sections.items():
        cls = sec_field.default_factory  # type: ignore[misc]
        values = data.get(name, {})
        _check(isinstance(values, dict), name, values, "a table of keys")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            _check(key in known, f"{name}.{key}", values[key],
                   f"keys of [{name}]: " + ", ".join(sorted(known)))
        kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
        built[name] = cls(**kwargs)
    return Config(**built)


def _parse_value(text: str) -> Any:
    """A CLI value as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"override {item!r} is invalid; accepted: section.key=value, "
                "e.g. optim.lr=3e-4 or pipeline.partition=[2,2]"
            )
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
        out[parts[0]][parts[1]] = _parse_value(text.strip())
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < TOML file < overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    data.pop("recipe", None)  # a recipe's paper figures (pipelocal.recipes), not settings
    return from_dict(apply_overrides(data, overrides or []))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written into every run directory)."""
    lines: list[str] = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for item, after in itertools.pairwise(body):
        if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[item.target.id] = " ".join(after.value.value.split())
    return docs


def config_help() -> str:
    """Every config key with its default and meaning, for ``pipelocal train --help``."""
    lines = ["config keys (--set section.key=value; defaults shown):"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        docs, defaults = _field_docs(cls), config_to_dict(cls())
        lines.append(f"  [{section.name}]")
        for key, value in defaults.items():
            doc = f"  {docs[key]}" if key in docs else ""
            lines.append(f"    {section.name}.{key} = {json.dumps(value)}{doc}")
    return "\n".join(lines)
