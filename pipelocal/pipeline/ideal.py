"""The concurrent ideal, measured in the stage processes themselves (``pipeline.ideal_steps``).

After a training epoch every stage trains its blocks for a few more steps on a copy of the
last batch it trained, all stages at once and without a message between them, and then gets
back its exact training state. The step time is what the stage's own process, on its own
cores and threads, with its own memory, computes when nothing waits for a neighbour: the
bound the pipeline's throughput is measured against. Compared with separate processes run
before or after the pipeline, it leaves out the differences between processes and the
machine's drift between the two measurements.

The state a step changes is what a checkpoint holds (``LocalBlock.checkpoint_state``:
parameters, buffers, optimiser state, dropout generator, epoch), so it is restored the way
a resume restores it; the losses the extra steps record are dropped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelocal.engine import Engine
from pipelocal.microbatch import MicroBatch

__all__ = ["LastBatch", "ideal_step", "measure_ideal"]


@dataclass
class _Part:
    x: Tensor
    y: Tensor
    image: Tensor | None
    part: MicroBatch


def _shapes(*tensors: Tensor | None) -> list[tuple[int, ...] | None]:
    return [None if t is None else tuple(t.shape) for t in tensors]


class LastBatch:
    """Copies of the messages of the last training batch a stage began, but not of a batch
    with fewer rows than the one it holds (an epoch's short last batch). A receive buffer is
    reused, so each part is copied into a buffer of its own (allocated once per part)."""

    def __init__(self) -> None:
        self.epoch, self.rows = -1, 0
        self.parts: list[_Part] = []
        self._buffers: dict[int, _Part] = {}
        self._skipping = False

    def keep(self, x: Tensor, y: Tensor, image: Tensor | None, part: MicroBatch,
             epoch: int) -> None:
        if part.first:
            rows = part.batch_rows or int(y.shape[0])
            self._skipping = rows < self.rows and self.complete
            if self._skipping:
                return
            self.parts, self.epoch, self.rows = [], epoch, rows
        if self._skipping:
            return
        buf = self._buffers.get(part.index)
        if buf is None or _shapes(buf.x, buf.y, buf.image) != _shapes(x, y, image):
            buf = _Part(torch.empty_like(x), torch.empty_like(y),
                        None if image is None else torch.empty_like(image), part)
            self._buffers[part.index] = buf
        buf.x.copy_(x)
        buf.y.copy_(y)
        if image is not None and buf.image is not None:
            buf.image.copy_(image)
        buf.part = part
        self.parts.append(buf)

    @property
    def complete(self) -> bool:
        """True if it holds every micro-batch of its batch."""
        return bool(self.parts) and self.parts[-1].part.last and len(self.parts) == \
            self.parts[0].part.count

    def replay(self, engine: Engine) -> None:
        """Train ``engine`` on the batch again, micro-batch by micro-batch, as it was trained."""
        if not self.complete:
            raise RuntimeError("pipeline.ideal_steps: this stage has not trained a whole batch "
                               "to measure on")
        for p in self.parts:
            engine.train_micro(p.x, p.y, self.epoch, p.image, part=p.part)


def measure_ideal(engine: Engine, step: Callable[[], None], steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` (a training step of ``engine``; on CUDA
    timed between synchronisations); the engine's training state is then restored exactly."""
    saved = [copy.deepcopy(block.checkpoint_state()) for block in engine.blocks]
    cuda = engine.device.type == "cuda"
    times = []
    try:
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize(engine.device)
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(engine.device)
            times.append(time.perf_counter() - t0)
    finally:
        for block, state in zip(engine.blocks, saved):
            block.load_checkpoint_state(state)
        engine.pop_train_stats()  # the extra steps' losses are not the epoch's
    return times


def ideal_step(times: list[float]) -> float:
    """The measured step time: the mean after the first step (a warm-up)."""
    rest = times[1:] or times
    return round(sum(rest) / len(rest), 6)
