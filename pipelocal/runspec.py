"""What every process of a run agrees on before training starts: the frozen :class:`RunSpec`
and the :class:`Position` training resumes from. Built once by the launcher's preflight
(:func:`pipelocal.launch.preflight.preflight`), sent to every rank, never changed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from pipelocal.config import Config
from pipelocal.models import BlockSpec, build_model

__all__ = ["Position", "RunSpec"]


@dataclass(frozen=True)
class Position:
    """Where training resumes: batch ``batch`` of epoch ``epoch``; ``step`` batches done so far."""

    epoch: int = 0
    batch: int = 0
    step: int = 0

    def where(self, epochs: int) -> str:
        """The batch at this position as the progress line counts it, for every message:
        ``epoch 2/3, batch 4 (step 8)``, epoch and batch 1-based, the batch within its epoch;
        step = the batches before it in the whole run (as ``PIPELOCAL_INJECT_FAULT`` and the
        checkpoint folders count)."""
        return f"epoch {self.epoch + 1}/{epochs}, batch {self.batch + 1} (step {self.step})"


@dataclass(frozen=True)
class RunSpec:
    """The resolved config (stage count and partition fixed) plus what the data and the
    checkpoint told the launcher."""

    cfg: Config
    in_shape: tuple[int, ...]
    num_classes: int
    run_dir: Path
    resume: Path | None = None
    start: Position = field(default_factory=Position)
    note: str = ""
    """Why the run has the stage count it has; printed in the run's first line."""
    partition_auto: bool = False
    """The partition was chosen by profiling (recorded in the manifest: a resume re-chooses
    it for its own stage count) rather than given in pipeline.partition."""

    @property
    def world(self) -> int:
        """Worker ranks: pipeline.replicas x pipeline.stages."""
        return self.cfg.pipeline.replicas * self.cfg.pipeline.stages

    @cached_property
    def specs(self) -> tuple[BlockSpec, ...]:
        """The model's blocks, built once per process: they hold their layers' constructors
        (closures), so they are not sent to other ranks but built again on arrival."""
        return tuple(build_model(self.cfg.model, self.in_shape, self.num_classes))

    def evolve(self, **changes: Any) -> RunSpec:
        """A copy with ``changes`` (preflight's steps), keeping the built blocks when the
        model, its input and its classes are unchanged."""
        new = replace(self, **changes)
        same_model = (new.cfg.model == self.cfg.model and new.in_shape == self.in_shape
                      and new.num_classes == self.num_classes)
        if same_model and "specs" in self.__dict__:
            new.__dict__["specs"] = self.__dict__["specs"]
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "specs"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
