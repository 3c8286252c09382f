"""Rank 0's view of a pipeline: stage 0 in this process, the other stages behind a channel.

The trainer drives it exactly as it drives the single-process engine (see
:class:`~pipelocal.trainer.Pipe`); control messages follow the batches down the pipeline and
come back as a gather of every stage's statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from pipelocal.pipeline.channel import Kind, Message
from pipelocal.pipeline.stage import Stage

__all__ = ["DistPipe"]


class DistPipe:
    def __init__(self, stage: Stage, *, num_stages: int, wire_batch: int) -> None:
        self.stage, self.num_stages, self.wire_batch = stage, num_stages, wire_batch
        self.device = stage.engine.device

    def train(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None:
        self.stage.handle(Message(Kind.TRAIN, step, epoch, x, y))

    def evaluate(self, x: Tensor, y: Tensor) -> None:
        # Evaluation batches travel in wire-sized pieces (the wire shape is fixed).
        for start in range(0, y.numel(), self.wire_batch):
            end = start + self.wire_batch
            self.stage.handle(Message(Kind.EVAL, -1, -1, x[start:end], y[start:end]))

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        return self.stage.handle(Message(Kind.END_EPOCH, -1, epoch))

    def end_eval(self) -> dict[int, dict[str, int]]:
        merged: dict[int, dict[str, int]] = {}
        for stats in self.stage.handle(Message(Kind.END_EVAL)):
            merged.update(stats)
        return merged

    def checkpoint(self, ckpt: Path, step: int) -> None:
        # Returns once every stage has written its blocks; the trainer then commits the manifest.
        self.stage.handle(Message(Kind.CHECKPOINT, step))

    def close(self) -> None:
        """Send STOP down the pipeline and wait until it has been delivered."""
        self.stage.handle(Message(Kind.STOP))
