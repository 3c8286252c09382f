"""What every process of a run agrees on before training starts: :class:`Setup` and the
:class:`Position` training resumes from. Built once by the launcher, broadcast to every rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelocal.config import Config
from pipelocal.models import BlockSpec, build_model

__all__ = ["Position", "Setup"]


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


@dataclass
class Setup:
    """The resolved config plus what the data and the checkpoint told the launcher."""

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
    def specs(self) -> list[BlockSpec]:
        return build_model(self.cfg.model, self.in_shape, self.num_classes)
