"""The coordinator: the one training loop of a run (epochs, data feeding, evaluation, metrics,
checkpoints), in the single process or on rank 0 of a pipeline.

It drives a *pipe*: the whole model in this process (:class:`~pipelocal.pipeline.pipe.LocalPipe`) or
stage 0 of a pipeline whose other stages live in other processes
(:class:`~pipelocal.pipeline.pipe.DistPipe`). The loop is the same for both, which is
why a pipelined run reproduces the single-process one exactly. :func:`build_trainer` wires it
(data, loaders, metrics, the run's first line) for every launcher.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from pipelocal.checkpoint import (
    CheckpointError,
    DiskFull,
    checkpoint_dir,
    commit_checkpoint,
    locate_full,
    resolve_checkpoint,
)
from pipelocal.config import Config, config_to_dict
from pipelocal.data import BatchLoader, load_dataset, make_loaders
from pipelocal.data.prefetch import epoch_batches
from pipelocal.metrics import Metrics
from pipelocal.models import BlockSpec
from pipelocal.runspec import Position, RunSpec
from pipelocal.stop import stop_requested

__all__ = [
    "NonFiniteLoss",
    "Pipe",
    "Trainer",
    "build_trainer",
]

class NonFiniteLoss(RuntimeError):
    """A block's loss became NaN or Inf; the message names the block, the step and the last
    good checkpoint (``run.allow_nonfinite = true`` trains on regardless)."""


class Pipe(Protocol):
    num_stages: int
    device: torch.device
    """Where this process's blocks live: training batches are made for it."""

    def train_batch(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None: ...
    def eval_batch(self, x: Tensor, y: Tensor) -> None: ...
    def end_epoch(self, epoch: int) -> list[dict[str, Any]]: ...
    def end_eval(self) -> dict[int, dict[str, int]]: ...
    def measure_ideal(self, steps: int) -> list[dict[str, Any]]:
        """Every stage's ``{"stage", "ideal_step(s)"}`` (``pipeline.ideal_steps``)."""
    def checkpoint(self, ckpt: Path, step: int) -> dict[str, str]:
        """Every stage writes its blocks; returns {file name: sha256} of the files written."""
    def close(self) -> None: ...


class Trainer:
    def __init__(
        self,
        cfg: Config,
        pipe: Pipe,
        specs: Sequence[BlockSpec],
        train_loader: BatchLoader,
        test_loader: BatchLoader,
        run_dir: Path,
        *,
        metrics: Metrics,
        start: Position | None = None,
        partition_auto: bool = False,
    ) -> None:
        self.cfg, self.pipe, self.specs = cfg, pipe, list(specs)
        if cfg.data.on_device and pipe.device.type == "cuda":
            train_loader = train_loader.to(pipe.device)  # uint8 split on the GPU
        self.train_loader, self.test_loader = train_loader, test_loader
        self.run_dir, self.metrics, self.pos = Path(run_dir), metrics, start or Position()
        self.partition_auto = partition_auto
        self.last_checkpoint: Path | None = None

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        epochs, max_steps = cfg.run.epochs, cfg.run.max_steps
        result: dict[str, Any] = {"run_dir": str(self.run_dir), "stopped": None}
        epoch, batch, step = self.pos.epoch, self.pos.batch, self.pos.step
        t_run, first_epoch = time.perf_counter(), epoch
        complete = epoch >= epochs or (max_steps and step >= max_steps)
        if complete:
            result.update(stopped="complete", epoch=min(epoch, epochs))
        while epoch < epochs and not complete:
            n, epoch_start_step = self.train_loader.num_batches(epoch), step
            self.metrics.start_epoch(epoch, epochs, n, initial=batch)
            t0, samples = time.perf_counter(), 0
            with epoch_batches(self.train_loader, epoch, batch, prefetch=cfg.data.prefetch,
                               device=self.pipe.device) as batches:
                for _ in range(batch, n):
                    if stop_requested() or (max_steps and step >= max_steps):
                        break
                    x, y = next(batches)  # built ahead when data.prefetch > 0
                    self.pipe.train_batch(step, epoch, x, y)
                    step, samples = step + 1, samples + y.numel()
                    self.metrics.advance(samples / (time.perf_counter() - t0))
            i = batches.next_index  # the first batch not trained on; n after a full epoch
            if i < n:  # stopped inside the epoch: checkpoint exactly here and leave
                self.metrics.close_bar()
                result["stopped"] = "interrupted" if stop_requested() else "max_steps"
                if i > batch:  # the steps since the epoch began must be finite to be kept
                    self._check_finite(self.pipe.end_epoch(epoch), Position(epoch, batch,
                                                                            epoch_start_step))
                self._checkpoint(Position(epoch, i, step), Position(epoch, i - 1, step - 1))
                break
            stage_stats = self.pipe.end_epoch(epoch)  # every stage has finished the epoch
            elapsed = time.perf_counter() - t0
            self.metrics.close_bar()
            self._check_finite(stage_stats, Position(epoch, batch, epoch_start_step))
            record = self._epoch_record(epoch, step, samples, elapsed, stage_stats)
            record["data_wait(s)"] = round(batches.wait_s, 3)  # this thread waiting for data
            if cfg.pipeline.ideal_steps:  # after the epoch's clock, before evaluation
                for ideal in self.pipe.measure_ideal(cfg.pipeline.ideal_steps):
                    record[f"stage{ideal['stage']}/ideal_step(s)"] = ideal["ideal_step(s)"]
            record.update(self.evaluate())
            self.metrics.log(record)
            done = epoch + 1 - first_epoch
            eta = (time.perf_counter() - t_run) / done * (epochs - epoch - 1)
            self.metrics.echo(_epoch_line(record, epochs) + (f"  ETA {_hms(eta)}"
                                                             if epoch + 1 < epochs else ""))
            self.metrics.scalars(record)
            _keep_best(result, record)
            result.update(record)
            last = Position(epoch, n - 1, step - 1)
            epoch, batch = epoch + 1, 0
            if epoch % cfg.run.checkpoint_every == 0 or epoch == epochs:
                self._checkpoint(Position(epoch, 0, step), last)
        self.metrics.close()
        result["step"] = step
        result["epochs"] = epochs
        result["time/total(s)"] = round(time.perf_counter() - t_run, 3)
        result["checkpoint"] = str(self.last_checkpoint) if self.last_checkpoint else None
        return result

    def _check_finite(self, stages: list[dict[str, Any]], first: Position) -> None:
        """Stop on the first NaN/Inf loss, before anything of it is logged or checkpointed;
        ``first`` is the first batch trained since the statistics were last read.

        The blocks flag it on the device and the flag is read here with the epoch's sums, so
        the check costs no synchronisation per step (on a GPU: none beyond the epoch's one).
        """
        bad = [(s["nonfinite_at"], int(i), s["loss"]) for st in stages
               for i, s in st["blocks"].items() if s.get("nonfinite_at") is not None]
        if not bad or self.cfg.run.allow_nonfinite:
            return
        at, index, loss = min(bad)  # the earliest step, then the lowest block
        try:
            last = f"the last good checkpoint is {resolve_checkpoint(self.run_dir)}; resume " \
                   f"from it with --resume {self.run_dir} and a lower optim.lr"
        except CheckpointError:
            last = "no checkpoint was written before it; start again with a lower optim.lr"
        where = Position(first.epoch, first.batch + at, first.step + at).where(
            self.cfg.run.epochs)
        raise NonFiniteLoss(
            f"the loss of block {self.specs[index].name} (block {index}) became non-finite "
            f"at {where}; epoch mean {loss}; the run stopped without checkpointing it: "
            f"{last}, or set run.allow_nonfinite = true to train on"
        )

    def evaluate(self) -> dict[str, Any]:
        """Test accuracy of the output and of every block's local classifier."""
        for i in range(self.test_loader.num_batches(0)):
            self.pipe.eval_batch(*self.test_loader.batch(0, i))
        stats = self.pipe.end_eval()
        out_index = len(self.specs) - 1
        acc = {i: s["correct"] / max(s["count"], 1) for i, s in sorted(stats.items())}
        return {
            "test/acc": acc.get(out_index),
            "test/acc_local": {self.specs[i].name: a for i, a in acc.items() if i != out_index},
        }

    def _epoch_record(
        self, epoch: int, step: int, samples: int, elapsed: float, stages: list[dict[str, Any]]
    ) -> dict[str, Any]:
        blocks: dict[int, dict[str, Any]] = {}
        for stage in stages:
            blocks.update({int(k): v for k, v in stage["blocks"].items()})
        out = blocks[len(self.specs) - 1]
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "time/epoch(s)": round(elapsed, 3),
            "throughput(samples/s)": round(samples / max(elapsed, 1e-9), 1),
            "train/loss": out["loss"],
            "train/acc": out["acc"],
            "train/loss_local": {
                self.specs[i].name: s["loss"] for i, s in sorted(blocks.items())
                if i != len(self.specs) - 1
            },
        }
        for stage in stages:
            for key, value in stage.items():
                if key not in ("stage", "blocks"):
                    record[f"stage{stage['stage']}/{key}"] = value
        return record

    def _checkpoint(self, pos: Position, last: Position) -> None:
        """Checkpoint resume point ``pos``; ``last`` is the batch trained last, for messages."""
        try:
            self._write_checkpoint(pos)
        except DiskFull as exc:
            where = last.where(self.cfg.run.epochs) if last.step >= 0 else None
            raise locate_full(exc, where, self.run_dir, pos.step) from exc

    def _write_checkpoint(self, pos: Position) -> None:
        ckpt = checkpoint_dir(self.run_dir, pos.step)
        sha = self.pipe.checkpoint(ckpt, pos.step)  # every stage writes its own blocks
        commit_checkpoint(
            ckpt,
            {
                "epoch": pos.epoch,
                "batch": pos.batch,
                "step": pos.step,
                "num_blocks": len(self.specs),
                "blocks": [s.name for s in self.specs],
                "stages": self.pipe.num_stages,
                "partition_auto": self.partition_auto,
                "config": config_to_dict(self.cfg),
                "time": time.time(),
                "sha256": sha,  # of every block file as written; checked when loaded
            },
        )
        self.last_checkpoint = ckpt


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    train_acc = "-" if r["train/acc"] is None else f"{100 * r['train/acc']:.2f}%"
    line = (
        f"epoch {r['epoch']}/{epochs}  train loss {r['train/loss']:.4f} acc {train_acc}  "
        f"test acc {100 * r['test/acc']:.2f}%  {r['throughput(samples/s)']:,.0f} samples/s"
    )
    busy = [(k.split("/")[0], r[k] / max(r[k.replace("busy", "wall")], 1e-9))
            for k in sorted(r) if k.endswith("/busy(s)")]
    if busy:  # pipelined: how much of the epoch each stage spent computing
        line += "  busy " + " ".join(f"{name}:{100 * u:.0f}%" for name, u in busy)
    return line


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _keep_best(result: dict[str, Any], record: dict[str, Any]) -> None:
    acc = record.get("test/acc")
    if acc is not None and acc >= result.get("test/best_acc", -1.0):
        result["test/best_acc"], result["test/best_epoch"] = acc, record["epoch"]


def build_trainer(spec: RunSpec, pipe: Pipe, *, where: str) -> Trainer:
    """The coordinator of a run: data, loaders, metrics and the run's first line, then the loop.

    ``where`` says how the run is laid out (single process or pipeline, backend, device).
    """
    cfg, specs = spec.cfg, spec.specs
    dataset = load_dataset(cfg.data)
    train_loader, test_loader = make_loaders(dataset, cfg.data, cfg.run.seed)
    metrics = Metrics(spec.run_dir, progress=cfg.run.progress, tensorboard=cfg.run.tensorboard)
    note = f" ({spec.note})" if spec.note else ""
    metrics.echo(
        f"pipelocal: {where}{note}; {cfg.model.name} ({len(specs)} blocks) with rule "
        f"{cfg.rule.name} on {dataset.name}; run directory {spec.run_dir} (pid {os.getpid()})"
    )
    if spec.resume is not None:
        metrics.drop_after(spec.start.epoch)
    return Trainer(cfg, pipe, specs, train_loader, test_loader, spec.run_dir,
                   metrics=metrics, start=spec.start, partition_auto=spec.partition_auto)
