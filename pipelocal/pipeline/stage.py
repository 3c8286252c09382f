"""One pipeline stage: an engine over a contiguous slice of blocks, between two channels.

A stage receives (activation, labels, batch id) from the stage before it, trains its blocks on
it at once and sends the detached output on. With micro-batches each message is one
micro-batch: it passes all of the stage's blocks and goes on at once, so the next stage starts
on it while this one trains on the next; each block steps after the batch's last micro-batch.
Control messages travel the same path, so they arrive after every batch sent before them:
END_EPOCH / END_EVAL / CHECKPOINT are points where every stage has seen exactly the same
batches. There each stage joins a gather on the control group that brings its statistics (or
its checkpoint confirmation) to the coordinator, rank 0.
STOP ends the stage: it is passed on with its trailers, and the trailers from the stage before
are drained, so that nothing is left posted when the process group is destroyed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipelocal.checkpoint import DiskFull, checkpoint_dir, locate_full
from pipelocal.engine import Engine
from pipelocal.meters import StepTimer, epoch_stats, other_threads_cpu_s, reset_memory_stats
from pipelocal.pipeline.channel import Kind, Message, P2PChannel
from pipelocal.pipeline.faults import FAULT_ENV, parse_fault
from pipelocal.pipeline.ideal import LastBatch, ideal_step, measure_ideal
from pipelocal.runspec import Position

if TYPE_CHECKING:
    from pipelocal.pipeline.replicas import ReplicaSync

__all__ = ["Stage"]

class Stage:
    def __init__(
        self,
        stage: int,
        engine: Engine,
        *,
        inbox: P2PChannel | None,
        outbox: P2PChannel | None,
        control: dist.ProcessGroup,
        run_dir: Path,
        start: Position | None = None,
        epochs: int = 0,
        rank: int | None = None,
        sync: ReplicaSync | None = None,
        ideal_steps: int = 0,
    ) -> None:
        self.stage, self.engine = stage, engine
        self.rank = stage if rank is None else rank
        """This process's global rank (replica * stages + stage)."""
        self.sync = sync
        """The replicas' gradient hook of this stage (None: one replica)."""
        self.replica = sync.replica if sync is not None else 0
        self.inbox, self.outbox, self.control = inbox, outbox, control
        self.run_dir = Path(run_dir)
        self.current: tuple[int, int] = (-1, -1)
        """(epoch, step) of the message being handled, for error reports."""
        self.start, self.epochs = start or Position(), epochs
        self.position: Position | None = None
        """The last training batch this stage began (None before the first), for reports."""
        self._epoch_first_step = 0
        self.phase = "start-up"
        """What the stage is doing, for error reports: start-up, training, evaluation, ..."""
        self.on_phase: Callable[[str, Position | None], None] | None = None
        """Called with (phase, position) for every message (cheap: a launcher keeps the last
        one), so that it can say what a stage that stopped answering or died was doing."""
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self._fault = (parse_fault(os.environ.get(FAULT_ENV, ""), self.rank) if first_attempt
                       else None)
        self._timer = StepTimer(engine.device)
        self.ideal_steps = ideal_steps
        """``pipeline.ideal_steps``: > 0 keeps a copy of the last batch to measure on."""
        self._last = LastBatch()
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.samples, self.t_start = 0, None  # the clock starts with the epoch's first batch
        self._timer.pop_seconds()
        reset_memory_stats(self.engine.device)
        for ch in (self.inbox, self.outbox):
            if ch is not None:
                ch.recv_wait_s = ch.send_wait_s = ch.recv_s = ch.send_s = 0.0
        self._threads_cpu = other_threads_cpu_s()

    def serve(self) -> None:
        """Handle messages from the previous stage until STOP."""
        assert self.inbox is not None
        while self.handle(self.inbox.recv()) is not False:
            pass

    def where(self) -> str | None:
        """The last training batch begun, as every message names a position (or None)."""
        return None if self.position is None else self.position.where(self.epochs)

    def _track(self, msg: Message) -> None:
        if msg.kind != Kind.TRAIN:
            return
        if self.position is None or msg.epoch != self.position.epoch:  # an epoch's first batch
            resumed = msg.epoch == self.start.epoch and msg.step == self.start.step
            self._epoch_first_step = msg.step - (self.start.batch if resumed else 0)
        self.position = Position(msg.epoch, msg.step - self._epoch_first_step, msg.step)

    def handle(self, msg: Message) -> Any:
        """Process one message; returns the gathered results on rank 0, False after STOP."""
        self.current = (msg.epoch, msg.step)
        self._track(msg)
        if msg.kind in (Kind.TRAIN, Kind.EVAL):
            self._enter("training" if msg.kind == Kind.TRAIN else "evaluation")
            self._compute(msg)
            return None
        self._forward(msg)
        if msg.kind == Kind.END_EPOCH:
            self._enter("end-of-epoch gather")
            if self.sync is not None:  # evaluation and checkpoints see replica 0's buffers
                self.sync.broadcast_buffers(self.engine.blocks)
            return self._gather(self._epoch_stats())
        if msg.kind == Kind.END_EVAL:
            self._enter("evaluation gather")
            gathered = self._gather(self.engine.pop_eval_stats())
            self._reset_epoch()  # epoch statistics cover training only, not evaluation
            return gathered
        if msg.kind == Kind.IDEAL:
            self._enter("ideal measurement")
            dist.barrier(group=self.control)  # every stage starts at once
            times = measure_ideal(self.engine, lambda: self._last.replay(self.engine),
                                  self.ideal_steps)
            return self._gather({"stage": self.stage, "ideal_step(s)": ideal_step(times)})
        if msg.kind == Kind.CHECKPOINT:
            self._enter("checkpoint")
            if self.sync is not None:  # the replicas must agree before replica 0 writes
                self.sync.check_same(self.engine.blocks, msg.step)
            try:
                sha = (self.engine.save(checkpoint_dir(self.run_dir, msg.step))
                       if self.replica == 0 else {})
            except DiskFull as exc:
                raise locate_full(exc, self.where(), self.run_dir, msg.step) from exc
            gathered = self._gather(sha)  # rank 0 writes every file's sha256 in the manifest
            self._reset_epoch()  # nor checkpoint writes
            return gathered
        self._enter("shutdown")  # STOP: passed on with its trailers; the inbox's are drained
        if self.outbox is not None:
            self.outbox.close()
        if self.inbox is not None:
            self.inbox.drain()
        return False

    def _enter(self, phase: str) -> None:
        self.phase = phase
        if self.on_phase is not None:
            self.on_phase(phase, self.position)

    def _compute(self, msg: Message) -> None:
        assert msg.x is not None and msg.y is not None
        if self.t_start is None:
            self.t_start = time.perf_counter()
            if self.inbox is not None:  # the wait for the epoch's first batch (the pipeline's
                self.inbox.recv_wait_s = self.inbox.recv_s = 0.0  # fill) is before the clock
        # Stage 0 gets the batch in host memory (pinned on CUDA): one asynchronous copy to the
        # device here, so that neither the engine nor the outbox copies from the host behind the
        # step. Later stages' tensors are on the device already (no copy).
        dev = self.engine.device
        x, y = msg.x.to(dev, non_blocking=True), msg.y.to(dev, non_blocking=True)
        x = self._maybe_fail(msg.step, x) if msg.kind == Kind.TRAIN else x
        # The model's input: stage 0 receives it as x; later stages with it (if carried).
        image = x if self.engine.indices[0] == 0 else msg.image
        self._timer.start()
        if msg.kind == Kind.TRAIN:
            if self.sync is not None and msg.part.first:  # once per batch
                self.sync.begin_step(self.engine.blocks, msg.step)
            out = self.engine.train_micro(x, y, msg.epoch, image, part=msg.part)
            self.samples += msg.rows
        else:
            out = self.engine.eval_batch(x, y)
        self._timer.stop()
        if self.ideal_steps and msg.kind == Kind.TRAIN:  # before the buffer is reused
            self._last.keep(x, y, image, msg.part, msg.epoch)
        self._forward(Message(msg.kind, msg.step, msg.epoch, out, y, image, msg.part))

    def _forward(self, msg: Message) -> None:
        if self.outbox is not None:
            self.outbox.send(msg)

    def _gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def _epoch_stats(self) -> dict[str, Any]:
        stats = {
            "stage": self.stage,
            "blocks": self.engine.pop_train_stats(),
            **epoch_stats(self._timer, self.t_start, self.samples, self.engine.device),
            "recv_wait(s)": round(self.inbox.recv_wait_s, 4) if self.inbox else 0.0,
            "send_wait(s)": round(self.outbox.send_wait_s, 4) if self.outbox else 0.0,
            "recv_total(s)": round(self.inbox.recv_s, 4) if self.inbox else 0.0,
            "send_total(s)": round(self.outbox.send_s, 4) if self.outbox else 0.0,
            "other_threads_cpu(s)": _since(self._threads_cpu, other_threads_cpu_s()),
        }
        self._reset_epoch()
        return stats

    def _maybe_fail(self, step: int, x: Tensor) -> Tensor:
        if self._fault is None or self._fault[0] != step:
            return x
        kind = self._fault[1]
        if kind == "nan":
            return torch.full_like(x, float("nan"))
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as a stuck device or a debugger
        if kind == "perturb":  # this replica's first parameter drifts from the others'
            with torch.no_grad():
                next(self.engine.blocks[0].parameters()).view(-1)[0] += 1e-3
            return x
        raise RuntimeError(f"injected fault in stage {self.stage} at step {step}")


def _since(start: float | None, now: float | None) -> float | None:
    return None if start is None or now is None else round(now - start, 4)
