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

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RuleConfig",
    "RunConfig",
    "ScheduleConfig",
    "apply_overrides",
    "config_help",
    "config_to_dict",
    "load_config",
]


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
    nonlin: Literal["relu", "leaky_relu"] = "relu"
    batchnorm: bool = True
    """BatchNorm after each hidden layer (conv3x3-BN-nonlin in the paper)."""
    input_shape: tuple[int, ...] = ()
    """Input shape (C, H, W) the model is built for; empty = taken from the dataset."""

    def __post_init__(self) -> None:
        from pipelocal.models import available_models

        _check_name("model.name", self.name, available_models())
        _check(self.width > 0, "model.width", self.width, "a multiplier > 0")
        _check(self.hidden >= 1, "model.hidden", self.hidden, "an integer >= 1")
        _check(self.depth >= 1, "model.depth", self.depth, "an integer >= 1")
        _check(self.fc_width >= 1, "model.fc_width", self.fc_width, "an integer >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "0 <= p < 1")
        _check(
            self.nonlin in ("relu", "leaky_relu"), "model.nonlin", self.nonlin, "relu, leaky_relu"
        )
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
    """padcrop: zero padding before the random crop back to the input size."""
    cutout_px: int = 16
    """cutout: side of the zeroed square."""
    classes_per_batch: int = 0
    """If > 0, each training batch holds at most this many classes ..."""
    classes_per_batch_until_epoch: int = 0
    """... for epochs before this one (0 = for all epochs)."""
    train_limit: int = 0
    """If > 0, use only the first N training samples (quick experiments)."""

    def __post_init__(self) -> None:
        from pipelocal.data import available_datasets
        from pipelocal.data.augment import AUGMENTATIONS

        _check_name("data.name", self.name, available_datasets())
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, ">= 1"
        )
        for aug in self.augment:
            _check(
                aug in AUGMENTATIONS, "data.augment", self.augment, ", ".join(AUGMENTATIONS)
            )
        for key in ("jitter_px", "pad_px", "cutout_px", "classes_per_batch", "train_limit"):
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
    dim_in_decoder: int = 2048
    """pred: the activation is average-pooled until C*H*W <= this before the linear classifier."""
    target_proj_size: int = 128
    """bpf: size of the fixed random projection of the one-hot labels."""

    def __post_init__(self) -> None:
        from pipelocal.rules import available_rules

        _check_name("rule.name", self.name, available_rules())
        _check(0.0 <= self.beta <= 1.0, "rule.beta", self.beta, "0 <= beta <= 1")
        _check(self.dim_in_decoder >= 1, "rule.dim_in_decoder", self.dim_in_decoder, ">= 1")
        _check(
            self.target_proj_size >= 1, "rule.target_proj_size", self.target_proj_size, ">= 1"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"
    """Each block has its own optimiser of this kind."""
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    """sgd only."""
    nesterov: bool = True
    """sgd only."""

    def __post_init__(self) -> None:
        _check(self.name in ("adam", "sgd"), "optim.name", self.name, "adam, sgd")
        _check(self.lr > 0, "optim.lr", self.lr, "a learning rate > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "0 <= momentum < 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    name: Literal["step", "cosine", "constant"] = "step"
    """step: lr x gamma at each milestone (fractions of training); cosine: to 0 at the end."""
    milestones: tuple[float, ...] = (0.5, 0.75, 0.89, 0.94)
    gamma: float = 0.25

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
        _check(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "0 < gamma <= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    stages: int = 0
    """Worker processes, one per contiguous group of blocks; 1 = the single-process engine;
    0 = automatic: one per GPU, or 2 on CPU (at most one per block; len(partition) if given)."""
    partition: tuple[int, ...] = ()
    """Blocks per stage, e.g. [3, 2, 3]; empty = balanced by profiling (``pipelocal plan``)."""
    channel_depth: int = 2
    """Messages in flight between two stages (bounds memory and how far a fast stage runs ahead)."""
    wire_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of activations on the wire; auto = follow run.precision (bf16 -> bfloat16). With
    run.precision = fp32, bfloat16 halves traffic but breaks bitwise exactness."""
    threads_per_stage: int = 0
    """torch threads in each stage process; 0 = CPU cores // stages (at least 1)."""
    timeout_s: float = 120.0
    """Longest any blocking wait (receive, send, collective) may take before the run fails."""
    memory_cap_gib: float = 0.0
    """plan / automatic partition: per-stage memory cap in GiB (0 = none)."""

    def __post_init__(self) -> None:
        _check(self.stages >= 0, "pipeline.stages", self.stages, "an integer >= 0 (0 = auto)")
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
        _check(
            self.wire_dtype in ("auto", "float32", "bfloat16"),
            "pipeline.wire_dtype",
            self.wire_dtype,
            "auto, float32, bfloat16",
        )
        _check(self.threads_per_stage >= 0, "pipeline.threads_per_stage", self.threads_per_stage,
               "an integer >= 0")
        # Below a second, process-group set-up itself times out (in C++, with a long traceback).
        _check(self.timeout_s >= 1, "pipeline.timeout_s", self.timeout_s, "seconds >= 1")
        _check(self.memory_cap_gib >= 0, "pipeline.memory_cap_gib", self.memory_cap_gib, ">= 0")


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
    threads: int = 0
    """torch threads of the single-process engine; 0 = torch's default."""
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (and always at the end and on Ctrl-C)."""
    max_steps: int = 0
    """If > 0, stop (with a checkpoint) after this many training steps in total."""
    progress: bool = True
    """Show a progress bar on stderr."""
    deterministic: bool = True
    """Deterministic kernels (cuBLAS workspace, deterministic algorithms, cuDNN deterministic,
    no cuDNN benchmark). Off: cuDNN benchmarks for speed and bitwise exactness holds on CPU only."""
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
