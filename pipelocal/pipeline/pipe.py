"""The pipes the coordinator drives: the whole model in this process, or rank 0's handle on a
pipeline of stages in other processes.

Both satisfy :class:`~pipelocal.trainer.Pipe` (declared beside the loop that drives it, which
sits below the pipeline in the import layers), so one training loop serves every run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from pipelocal.engine import Engine, eval_pieces
from pipelocal.meters import StepTimer, epoch_stats, reset_memory_stats
from pipelocal.microbatch import split_batch
from pipelocal.pipeline.channel import Kind, Message
from pipelocal.pipeline.stage import Stage

__all__ = ["DistPipe", "LocalPipe"]


class LocalPipe:
    """The whole model in this process: what the trainer drives when pipeline.stages = 1.

    It records the epoch figures a pipeline stage records (compute time, peak memory), under
    ``stage0/``; evaluation runs in pieces of ``eval_piece`` rows (:func:`eval_pieces`).
    """

    num_stages = 1

    def __init__(self, engine: Engine, *, eval_piece: int) -> None:
        self.engine, self.eval_piece = engine, eval_piece
        self.device = engine.device
        self._timer = StepTimer(self.device)
        self._reset()

    def _reset(self) -> None:
        self._samples, self._t_start = 0, None
        self._timer.pop_seconds()
        reset_memory_stats(self.device)

    def train_batch(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        self._timer.start()
        self.engine.train_batch(x, y, epoch)
        self._timer.stop()
        self._samples += int(y.shape[0])

    def eval_batch(self, x: Tensor, y: Tensor) -> None:
        for px, py in eval_pieces(x, y, self.eval_piece):
            self.engine.eval_batch(px, py)

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        stats = {"stage": 0, "blocks": self.engine.pop_train_stats(),
                 **epoch_stats(self._timer, self._t_start, self._samples, self.device)}
        self._reset()
        return [stats]

    def end_eval(self) -> dict[int, dict[str, int]]:
        stats = self.engine.pop_eval_stats()
        self._reset()  # epoch figures cover training only
        return stats

    def checkpoint(self, ckpt: Path, step: int) -> dict[str, str]:
        return self.engine.save(ckpt)

    def close(self) -> None:
        pass


class DistPipe:
    """Rank 0's view of a pipeline: stage 0 here, the other stages behind its outbox."""

    def __init__(self, stage: Stage, *, num_stages: int, wire_batch: int) -> None:
        self.stage, self.num_stages, self.wire_batch = stage, num_stages, wire_batch
        self.device = stage.engine.device

    def train_batch(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None:
        # One message per micro-batch: each one leaves stage 0 as soon as it is trained.
        for part, (px, py) in split_batch((x, y), self.stage.engine.micro_batches):
            assert px is not None and py is not None
            self.stage.handle(Message(Kind.TRAIN, step, epoch, px, py, part=part))

    def eval_batch(self, x: Tensor, y: Tensor) -> None:
        # Evaluation batches travel in wire-sized pieces (the wire shape is fixed).
        for px, py in eval_pieces(x, y, self.wire_batch):
            self.stage.handle(Message(Kind.EVAL, -1, -1, px, py))

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        return self.stage.handle(Message(Kind.END_EPOCH, -1, epoch))

    def end_eval(self) -> dict[int, dict[str, int]]:
        merged: dict[int, dict[str, int]] = {}
        for stats in self.stage.handle(Message(Kind.END_EVAL)):
            merged.update(stats)
        return merged

    def checkpoint(self, ckpt: Path, step: int) -> dict[str, str]:
        # Returns once every stage has written its blocks; the trainer then commits the manifest.
        merged: dict[str, str] = {}
        for sha in self.stage.handle(Message(Kind.CHECKPOINT, step)):
            merged.update(sha)
        return merged

    def close(self) -> None:
        """Send STOP (and its trailers) down the pipeline and wait until delivered."""
        self.stage.handle(Message(Kind.STOP))
