"""One pipeline stage: an engine over a contiguous slice of blocks, between two channels.

A stage receives (activation, labels, batch id) from the stage before it, trains its blocks on
it at once and sends the detached output on. Control messages travel the same path, so they
arrive after every batch sent before them: END_EPOCH / END_EVAL / CHECKPOINT are points where
every stage has seen exactly the same batches. There each stage joins a gather on the control
group that brings its statistics (or its checkpoint confirmation) to the coordinator, rank 0.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.checkpoint import checkpoint_dir
from pipelocal.engine import Engine
from pipelocal.pipeline.channel import Kind, Message, P2PChannel

__all__ = ["FAULT_ENV", "Stage", "peak_memory_mib"]

FAULT_ENV = "PIPELOCAL_INJECT_FAULT"
"""Fault injection for tests: ``"<stage>:<step>:raise"`` or ``"<stage>:<step>:kill"``."""


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    ) -> None:
        self.stage, self.engine = stage, engine
        self.inbox, self.outbox, self.control = inbox, outbox, control
        self.run_dir = Path(run_dir)
        self.current: tuple[int, int] = (-1, -1)
        """(epoch, step) of the message being handled, for error reports."""
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""), stage)
        self._reset_timers()

    def _reset_timers(self) -> None:
        self.busy_s, self.samples, self.t_start = 0.0, 0, time.perf_counter()
        for ch in (self.inbox, self.outbox):
            if ch is not None:
                ch.recv_wait_s = ch.send_wait_s = 0.0

    def serve(self) -> None:
        """Handle messages from the previous stage until STOP."""
        assert self.inbox is not None
        while self.handle(self.inbox.recv()) is not False:
            pass

    def handle(self, msg: Message) -> Any:
        """Process one message; returns the gathered results on rank 0, False after STOP."""
        self.current = (msg.epoch, msg.step)
        if msg.kind in (Kind.TRAIN, Kind.EVAL):
            self._compute(msg)
            return None
        self._forward(msg)
        if msg.kind == Kind.END_EPOCH:
            return self._gather(self._epoch_stats())
        if msg.kind == Kind.END_EVAL:
            gathered = self._gather(self.engine.pop_eval_stats())
            self._reset_timers()  # epoch statistics cover training only, not evaluation
            return gathered
        if msg.kind == Kind.CHECKPOINT:
            self.engine.save(checkpoint_dir(self.run_dir, msg.step))
            gathered = self._gather(self.engine.indices)
            self._reset_timers()  # nor checkpoint writes
            return gathered
        if self.outbox is not None:  # STOP: deliver it before leaving
            self.outbox.flush()
        return False

    def _compute(self, msg: Message) -> None:
        assert msg.x is not None and msg.y is not None
        if msg.kind == Kind.TRAIN:
            self._maybe_fail(msg.step)
        # The model's input: stage 0 receives it as x; later stages with it (if carried).
        image = msg.x if self.engine.indices[0] == 0 else msg.image
        t0 = time.perf_counter()
        if msg.kind == Kind.TRAIN:
            out = self.engine.train(msg.x, msg.y, msg.epoch, image=image)
            self.samples += msg.rows
        else:
            out = self.engine.evaluate(msg.x, msg.y)
        self.busy_s += time.perf_counter() - t0
        self._forward(Message(msg.kind, msg.step, msg.epoch, out, msg.y, image))

    def _forward(self, msg: Message) -> None:
        if self.outbox is not None:
            self.outbox.send(msg)

    def _gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * dist.get_world_size() if self.stage == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def _epoch_stats(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t_start
        stats = {
            "stage": self.stage,
            "blocks": self.engine.pop_train_stats(),
            "busy(s)": round(self.busy_s, 4),
            "wall(s)": round(wall, 4),
            "samples": self.samples,
            "samples/s": round(self.samples / max(self.busy_s, 1e-9), 1),
            "recv_wait(s)": round(self.inbox.recv_wait_s, 4) if self.inbox else 0.0,
            "send_wait(s)": round(self.outbox.send_wait_s, 4) if self.outbox else 0.0,
            "peak_mem(MiB)": round(peak_memory_mib(self.engine.device), 1),
        }
        self._reset_timers()
        return stats

    def _maybe_fail(self, step: int) -> None:
        if self._fault is not None and self._fault[0] == step:
            if self._fault[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault in stage {self.stage} at step {step}")


def _parse_fault(spec: str, stage: int) -> tuple[int, str] | None:
    if not spec:
        return None
    s, step, kind = spec.split(":")
    return (int(step), kind) if int(s) == stage else None
