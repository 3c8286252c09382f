"""The single-process engine: a contiguous run of blocks trained in order, in one process.

With all blocks it is the reference every pipelined run must reproduce bit for bit; each
pipeline stage runs one of these over its own slice of blocks. For each minibatch and each
block in order: forward, local loss, backward, optimiser step, pass the detached output on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipelocal.block import LocalBlock
from pipelocal.checkpoint import load_block_state, save_block_state
from pipelocal.config import Config
from pipelocal.models import BlockSpec
from pipelocal.rules import RuleContext

__all__ = ["Engine", "LocalPipe", "build_blocks"]


def build_blocks(
    cfg: Config,
    specs: Sequence[BlockSpec],
    num_classes: int,
    indices: Sequence[int],
    device: torch.device | str,
) -> list[LocalBlock]:
    """Build blocks ``indices`` of the model; block i is the same whichever process builds it."""
    return [
        LocalBlock(
            i,
            specs[i],
            num_classes=num_classes,
            rule=cfg.rule,
            optim=cfg.optim,
            schedule=cfg.schedule,
            epochs=cfg.run.epochs,
            seed=cfg.run.seed,
            device=device,
            precision=cfg.run.precision,
            context=RuleContext(tuple(specs), i),
        )
        for i in indices
    ]


class Engine:
    """Blocks ``blocks`` (contiguous, in order) of one model, in this process."""

    def __init__(self, blocks: Sequence[LocalBlock]) -> None:
        self.blocks = list(blocks)
        self.device = self.blocks[0].device
        rule = self.blocks[0].rule
        self.is_global = rule is not None and rule.is_global
        self.needs_image = any(b.needs_image for b in self.blocks)
        """Some block's rule needs the model's input image (InfoPro): see :meth:`train`."""
        self._eval_correct: dict[int, Tensor] = {}
        self._eval_count = 0

    @property
    def indices(self) -> list[int]:
        return [b.index for b in self.blocks]

    def train_batch(
        self, x: Tensor, y: Tensor, epoch: int, image: Tensor | None = None
    ) -> Tensor:
        """One training step of every block on batch (x, y); returns the last block's output.

        ``image`` is the model's input batch, for rules that need it; an engine starting at
        block 0 takes ``x`` itself, a later pipeline stage receives it with the activation.
        """
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for block in self.blocks:
            block.set_epoch(epoch)
        if self.is_global:
            return self._train_global(x, y)
        if self.needs_image:
            image = self.input_image(x, image)
        for block in self.blocks:
            x = block.train_step(x, y, image)
        return x

    def input_image(self, x: Tensor, image: Tensor | None) -> Tensor:
        """The model's input batch: ``x`` itself when this engine starts at block 0."""
        if self.blocks[0].index == 0:
            return x
        if image is None:
            raise RuntimeError(
                f"blocks {self.indices} need the model's input image (rule infopro) but none "
                "arrived with the activation; the pipeline channel must carry it"
            )
        return image.to(self.device, non_blocking=True)

    def _train_global(self, x: Tensor, y: Tensor) -> Tensor:
        """glob / glob+sim: end-to-end backprop of the output's cross-entropy (+ sim losses)."""
        if not self.blocks[-1].is_output or self.blocks[0].index != 0:
            raise RuntimeError("global (backprop) rules need every block in one engine")
        losses: list[Tensor] = []
        for block in self.blocks:
            block.train(True)
            with block.autocast():
                h = block(x.float())
                loss, scores = block.local_loss(h, y)
            losses.append(loss)  # glob: zero for hidden blocks; glob+sim: their sim loss
            block.record(loss, scores, y)
            x = block.pass_on(h)
        for block in self.blocks:
            block.optimizer.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        for block in self.blocks:
            block.optimizer.step()
        return x.detach()

    @torch.no_grad()
    def eval_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward only; counts each block's correct class predictions (output and local)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for block in self.blocks:
            x, scores = block.eval_step(x)
            if scores is not None:
                correct = (scores.argmax(1) == y).sum()
                prev = self._eval_correct.get(block.index)
                self._eval_correct[block.index] = correct if prev is None else prev + correct
        self._eval_count += y.numel()
        return x

    def pop_eval_stats(self) -> dict[int, dict[str, int]]:
        """{block index: {"correct", "count"}} since the last call (blocks with a classifier)."""
        out = {i: {"correct": int(c), "count": self._eval_count}
               for i, c in self._eval_correct.items()}
        self._eval_correct, self._eval_count = {}, 0
        return out

    def pop_train_stats(self) -> dict[int, dict[str, Any]]:
        return {b.index: b.pop_stats() for b in self.blocks}

    def save(self, ckpt: Path) -> None:
        for block in self.blocks:
            save_block_state(ckpt, block.index, block.checkpoint_state())

    def load(self, ckpt: Path) -> None:
        for block in self.blocks:
            block.load_checkpoint_state(load_block_state(ckpt, block.index))


class LocalPipe:
    """The whole model in this process: what the trainer drives when pipeline.stages = 1."""

    num_stages = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.device = engine.device

    def train_batch(self, step: int, epoch: int, x: Tensor, y: Tensor) -> None:
        self.engine.train_batch(x, y, epoch)

    def eval_batch(self, x: Tensor, y: Tensor) -> None:
        self.engine.eval_batch(x, y)

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        return [{"stage": 0, "blocks": self.engine.pop_train_stats()}]

    def end_eval(self) -> dict[int, dict[str, int]]:
        return self.engine.pop_eval_stats()

    def checkpoint(self, ckpt: Path, step: int) -> None:
        self.engine.save(ckpt)

    def close(self) -> None:
        pass
