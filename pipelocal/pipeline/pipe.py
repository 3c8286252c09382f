"""The pipes the coordinator drives: the whole model in this process, or rank 0's handle on a
pipeline of stages in other processes.

Both satisfy :class:`~pipelocal.trainer.Pipe` (declared beside the loop that drives it, which
sits below the pipeline in the import layers), so one training loop serves every run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pipelocal.engine import Engine, eval_pieces
from pipelocal.meters import StepTimer, epoch_stats, reset_memory_stats
from pipelocal.microbatch import split_batch
from pipelocal.pipeline.channel import Kind, Message, P2PChannel
from pipelocal.pipeline.ideal import ideal_step, measure_ideal
from pipelocal.pipeline.replicas import replica_slices
from pipelocal.pipeline.stage import Stage

__all__ = ["DistPipe", "LocalPipe", "merge_replica_stats"]


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
        # The last batch trained, for pipeline.ideal_steps (the loader does not reuse it), but
        # not one with fewer rows (an epoch's short last batch).
        self._last: tuple[Tensor, Tensor, int] | None = None
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
        if self._last is None or y.shape[0] >= self._last[1].shape[0]:  # not a short batch
            self._last = (x, y, epoch)

    def eval_batch(self, x: Tensor, y: Tensor) -> None:
        for px, py in eval_pieces(x, y, self.eval_piece):
            self.engine.eval_batch(px, py)

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        stats = {"stage": 0, "blocks": self.engine.pop_train_stats(),
                 **epoch_stats(self._timer, self._t_start, self._samples, self.device)}
        self._reset()
        return [stats]

    def measure_ideal(self, steps: int) -> list[dict[str, Any]]:
        if self._last is None:
            raise RuntimeError("pipeline.ideal_steps: no batch trained to measure on")
        x, y, epoch = self._last
        times = measure_ideal(self.engine, lambda: self.engine.train_batch(x, y, epoch), steps)
        return [{"stage": 0, "ideal_step(s)": ideal_step(times)}]

    def end_eval(self) -> dict[int, dict[str, int]]:
        stats = self.engine.pop_eval_stats()
        self._reset()  # epoch figures cover training only
        return stats

    def checkpoint(self, ckpt: Path, step: int) -> dict[str, str]:
        return self.engine.save(ckpt)

    def close(self) -> None:
        pass


class DistPipe:
    """Rank 0's view of a pipeline: stage 0 here, the other stages behind its outbox; with
    replicas, the other replicas' first stages behind ``feeds`` (one channel each, replica 1
    first), which carry their slice of every batch and every control message."""

    def __init__(self, stage: Stage, *, num_stages: int, wire_batch: int,
                 feeds: Sequence[P2PChannel] = ()) -> None:
        self.stage, self.num_stages, self.wire_batch = stage, num_stages, wire_batch
        self.device = stage.engine.device
        self.feeds = list(feeds)
        self.replicas = len(self.feeds) + 1
        self._eval_pieces = 0

    def train_batch(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None:
        parts = [slice(None)]
        if self.feeds:
            rows = int(y.shape[0])
            if rows < self.replicas:  # a class-limited batch can be this small (preflight
                # checks data.batch_size and the last batch)
                raise RuntimeError(
                    f"batch {step} has {rows} rows, fewer than pipeline.replicas = "
                    f"{self.replicas}: each replica needs at least one; use fewer replicas or "
                    "larger batches (data.classes_per_batch makes some batches smaller)")
            parts = replica_slices(rows, self.replicas)
        # Each replica's slice, one message per micro-batch of it: each leaves as soon as it
        # is ready (the other replicas' first, so that they start at once).
        m = self.stage.engine.micro_batches
        for feed, rows_of in zip(self.feeds, parts[1:]):
            for part, (px, py) in split_batch((x[rows_of], y[rows_of]), m):
                assert px is not None and py is not None
                feed.send(Message(Kind.TRAIN, step, epoch, *self._to_device(px, py), part=part))
        for part, (px, py) in split_batch((x[parts[0]], y[parts[0]]), m):
            assert px is not None and py is not None
            self.stage.handle(Message(Kind.TRAIN, step, epoch, px, py, part=part))

    def _to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # NCCL sends from the device: one asynchronous copy (pinned host memory on CUDA).
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def eval_batch(self, x: Tensor, y: Tensor) -> None:
        # Evaluation batches travel in wire-sized pieces (the wire shape is fixed), dealt to the
        # replicas in turn: every piece is computed as one process computes it.
        for px, py in eval_pieces(x, y, self.wire_batch):
            replica = self._eval_pieces % self.replicas
            self._eval_pieces += 1
            if replica == 0:
                self.stage.handle(Message(Kind.EVAL, -1, -1, px, py))
            else:
                self.feeds[replica - 1].send(Message(Kind.EVAL, -1, -1,
                                                     *self._to_device(px, py)))

    def _control(self, msg: Message) -> list[Any]:
        """``msg`` to every replica, then through this one; every rank's gathered answer."""
        for feed in self.feeds:
            feed.send(msg)
        return self.stage.handle(msg)

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        gathered = self._control(Message(Kind.END_EPOCH, -1, epoch))
        return merge_replica_stats(gathered, self.num_stages) if self.feeds else gathered

    def measure_ideal(self, steps: int) -> list[dict[str, Any]]:
        """Every stage's concurrent ideal (``pipeline.ideal_steps = steps``, which each stage
        was built with), in stage order."""
        assert not self.feeds, "pipeline.ideal_steps: one replica only"
        return self._control(Message(Kind.IDEAL))

    def end_eval(self) -> dict[int, dict[str, int]]:
        self._eval_pieces = 0
        merged: dict[int, dict[str, int]] = {}
        for stats in self._control(Message(Kind.END_EVAL)):
            for index, s in stats.items():  # each replica counted its own pieces
                total = merged.setdefault(index, {"correct": 0, "count": 0})
                total["correct"] += s["correct"]
                total["count"] += s["count"]
        return merged

    def checkpoint(self, ckpt: Path, step: int) -> dict[str, str]:
        # Returns once every stage has written its blocks; the trainer then commits the manifest.
        merged: dict[str, str] = {}
        for sha in self._control(Message(Kind.CHECKPOINT, step)):
            merged.update(sha)
        return merged

    def close(self) -> None:
        """Send STOP (and its trailers) down every pipeline and wait until delivered."""
        for feed in self.feeds:
            feed.send(Message(Kind.STOP))
            feed.close()
        self.stage.handle(Message(Kind.STOP))


def merge_replica_stats(gathered: list[dict[str, Any]], stages: int) -> list[dict[str, Any]]:
    """Every rank's epoch statistics (rank order) -> one entry per stage: its blocks' figures
    over all replicas (loss weighted by rows, accuracy by scored rows), its timings replica
    0's."""
    out = []
    for s in range(stages):
        replicas = gathered[s::stages]
        entry = dict(replicas[0])
        entry["blocks"] = {i: _merge_block([r["blocks"][i] for r in replicas])
                           for i in replicas[0]["blocks"]}
        out.append(entry)
    return out


def _merge_block(parts: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(p["rows"] for p in parts)
    scored = sum(p["scored"] for p in parts)
    bad = [p["nonfinite_at"] for p in parts if p["nonfinite_at"] is not None]
    correct = sum(round(p["acc"] * p["scored"]) for p in parts if p["acc"] is not None)
    return {
        "loss": sum(p["loss"] * p["rows"] for p in parts) / max(rows, 1),
        "acc": correct / scored if scored else None,
        "nonfinite_at": min(bad) if bad else None,
        "rows": rows,
        "scored": scored,
    }
