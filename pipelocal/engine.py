"""The engine: blocks trained by their local rules, in one process.

:class:`LocalBlock` is one block with its local rule, its own optimiser, schedule and random
generator. A block's update at step t depends only on its own state and the input it receives
for batch t; nothing flows backward out of it. This is what lets the single-process engine and
every pipeline stage run the very same ``train_step`` and get bit-identical results.

:class:`Engine` is a contiguous run of blocks trained in order. With all blocks it is the
reference every pipelined run must reproduce bit for bit; each pipeline stage runs one of these
over its own slice of blocks. For each minibatch and each block in order: forward, local loss,
backward, optimiser step, pass the detached output on. With ``micro_batches = M`` each batch
goes through the blocks in M micro-batches (:mod:`pipelocal.microbatch`): each block
accumulates the row-weighted gradients of its micro-batches and steps after the last one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelocal.checkpoint import (
    CheckpointError,
    block_file,
    load_block_state,
    save_block_state,
)
from pipelocal.config import Config, OptimConfig, RuleConfig, ScheduleConfig
from pipelocal.data import dataset_stats
from pipelocal.microbatch import WHOLE, MicroBatch, split_batch, wire_rows
from pipelocal.models import BlockSpec
from pipelocal.models.init import he_normal_
from pipelocal.optim import build_optimizer, learning_rate
from pipelocal.rules import RULES, LocalRule, RuleContext, build_rule, end_to_end_top
from pipelocal.rules.fa import feedback_align

__all__ = [
    "Engine",
    "GradSync",
    "LocalBlock",
    "block_seed",
    "build_blocks",
    "eval_pieces",
    "piece_rows",
    "train_end_to_end",
]

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
"""run.precision -> the autocast dtype of the blocks and heads (master weights stay float32)."""


class GradSync(Protocol):
    """What a block calls in place of its optimiser step when gradients are shared with other
    processes (data-parallel replicas, :mod:`pipelocal.pipeline.replicas`): ``step`` after the
    backward (it may defer the optimiser step), ``flush`` once the engine's batch is done, so
    that every deferred step has happened."""

    def step(self, block: LocalBlock, rows: int) -> None: ...

    def flush(self) -> None: ...


def block_seed(run_seed: int, index: int) -> int:
    """Seed of block ``index``'s initialisation and dropout, independent of every other block."""
    return (run_seed * 1_000_003 + 7919 * (index + 1)) % (2**63)


class LocalBlock(nn.Module):
    """Block ``index`` of a model, trained by its own local loss (the output block: cross-entropy).

    ``train_step(x, y)`` runs forward, local loss, backward and an optimiser step, and returns
    the detached output to pass on; ``eval_step(x)`` returns ``(output, class_scores)``.
    """

    def __init__(
        self,
        index: int,
        spec: BlockSpec,
        *,
        num_classes: int,
        rule: RuleConfig,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        epochs: int,
        seed: int,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        context: RuleContext | None = None,
        init: str = "auto",
        top: range | None = None,
    ) -> None:
        super().__init__()
        self.index, self.spec = index, spec
        self.top = top
        """The top blocks this one learns with, end to end, from the output loss (see
        :func:`~pipelocal.rules.end_to_end_top`); None: it learns from its own loss."""
        self.schedule, self.epochs, self.base_lr = schedule, epochs, optim.lr
        self.autocast_dtype = _AUTOCAST[precision]
        seed_i = self.seed = block_seed(seed, index)
        rule_cls = RULES.get(rule.name)
        # Initialise on the CPU from this block's own seed, never from the global RNG stream.
        # Only the CPU default generator is seeded and restored: torch.manual_seed would also
        # reseed every CUDA device's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed_i)
            self.body = spec.make()
            self.rule: LocalRule | None = None
            if spec.kind != "output" and (top is None or rule_cls.is_global):
                shape = spec.wire_shape if rule_cls.classifier_reads_passed_on else spec.out_shape
                self.rule = build_rule(shape, num_classes, rule, context)
            self.init = rule_cls.authors_init if init == "auto" else init
            if self.init == "he-normal":
                he_normal_(self)  # body and rule heads, from this block's seed
            if rule_cls.feedback_alignment:
                self.body = feedback_align(self.body)
        if (spec.kind == "output" and self.init == "pytorch" and rule.zero_init
                and not rule_cls.is_global):
            # The authors zero the output layer's weight whenever the hidden layers learn locally.
            nn.init.zeros_([m for m in self.body.modules() if isinstance(m, nn.Linear)][-1].weight)
        self.output_scale = rule_cls.output_loss_scale(rule) if spec.kind == "output" else 1.0
        self.classifier_reads_passed_on = rule_cls.classifier_reads_passed_on
        self.device = torch.device(device)
        self.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed_i + 1)  # dropout masks
        self.optimizer = build_optimizer([p for p in self.parameters() if p.requires_grad], optim)
        self.epoch = -1
        self.grad_sync: GradSync | None = None
        """None: the optimiser steps right after the backward; else this hook steps it."""
        self._reset_stats()

    # ------------------------------------------------------------------ training

    @property
    def is_output(self) -> bool:
        return self.spec.kind == "output"

    @property
    def end_to_end(self) -> bool:
        """True if this block learns together with the blocks above it (:attr:`top`)."""
        return self.top is not None

    def set_epoch(self, epoch: int) -> None:
        """Set the learning rate of ``epoch`` (the schedule is a pure function of the epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            lr = learning_rate(self.schedule, self.base_lr, epoch, self.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    @property
    def needs_image(self) -> bool:
        """True if the rule's loss also needs the model's input image (InfoPro)."""
        return self.rule is not None and self.rule.needs_image

    def local_loss(
        self, h: Tensor, y: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """This block's loss on its output ``h`` and the class scores it predicts (if any)."""
        if self.rule is None:
            if not self.is_output:  # an end-to-end top block: only the output loss trains it
                return h.new_zeros((), dtype=torch.float32), None
            return self.output_scale * F.cross_entropy(h, y), h.detach()
        if self.needs_image:
            return self.rule.loss(h, y, image=image)  # type: ignore[call-arg]
        return self.rule.loss(h, y)

    def _dropout(self, h: Tensor, p: float, channels: bool) -> Tensor:
        """Inverted dropout (training only), mask from this block's generator.

        ``channels``: one draw per feature map, mask [B, C, 1, 1] (``nn.Dropout2d``), so a
        dropped map is zero everywhere; else one draw per value.
        """
        if not self.training or p <= 0:
            return h
        channels = channels and h.dim() == 4
        shape = (h.size(0), h.size(1), 1, 1) if channels else h.shape
        keep = torch.empty(shape, dtype=h.dtype, device=h.device)
        keep.bernoulli_(1.0 - p, generator=self.generator)
        return h * keep / (1.0 - p)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output: its body on the (training: input-dropped) input."""
        return self.body(self._dropout(x, self.spec.input_dropout, channels=False))

    def pass_on(self, h: Tensor) -> Tensor:
        """What the next block receives: dropout (training only) and the block's max-pool."""
        spec = self.spec
        if not spec.dropout_after_pool:
            h = self._dropout(h, spec.dropout, spec.channel_dropout)
        if spec.pool > 1:
            h = F.max_pool2d(h, spec.pool, spec.pool_stride or spec.pool, spec.pool_padding)
        if spec.dropout_after_pool:
            h = self._dropout(h, spec.dropout, spec.channel_dropout)
        return h

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(
        self, x: Tensor, y: Tensor, image: Tensor | None = None, *, part: MicroBatch = WHOLE
    ) -> Tensor:
        """One update on (x, y); ``image`` is the model's input, for rules that need it.

        ``part``: which micro-batch of its batch (x, y) is: the gradients are zeroed at the
        first, accumulated with weight rows / batch rows, and the optimiser steps at the last.
        """
        if self.end_to_end:
            raise RuntimeError(
                f"block {self.index} ({self.spec.name}) learns end to end with blocks "
                f"{self.top.start}..{self.top.stop - 1} from the output loss; train them "
                "together (Engine.train_batch, train_end_to_end), not one by one"
            )
        # Every block starts from float32: whether its input came straight from the block before
        # (bf16 under autocast) or over a wire in any dtype, it computes the same thing.
        x = x.float()
        self.train(True)
        with self.autocast():  # forward and loss; backward runs outside, as autocast wants
            h = self(x)
            if self.classifier_reads_passed_on:  # dropped and pooled, as it is passed on
                h = self.pass_on(h)
            loss, scores = self.local_loss(h, y, image)
        if part.first:
            self.optimizer.zero_grad(set_to_none=True)
        _backward(loss, part, y)  # frees this micro-batch's graph
        if part.last:
            self.optimizer_step(part.batch_rows or y.numel())
        self.record(loss, scores, y, last=part.last)
        return h.detach() if self.classifier_reads_passed_on else self.pass_on(h.detach())

    def optimizer_step(self, rows: int) -> None:
        """The optimiser step after a backward on ``rows`` rows, through :attr:`grad_sync`."""
        if self.grad_sync is None:
            self.optimizer.step()
        else:
            self.grad_sync.step(self, rows)

    @torch.no_grad()
    def eval_step(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        self.train(False)
        with self.autocast():
            h = self(x.float())
            out = self.pass_on(h)
            if self.rule is None:
                return out, h if self.is_output else None
            return out, self.rule.logits(out if self.classifier_reads_passed_on else h)

    # ------------------------------------------------------------------ statistics

    def _reset_stats(self) -> None:
        # Sums stay on the device: reading them is a sync point, done once per epoch.
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._count = 0
        self._scored = 0
        self._steps = 0
        # Index (since the reset) of the first step whose loss was NaN/Inf, -1 if none. Kept on
        # the device and read with the sums: checking every step would be a sync per step.
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)

    def record(self, loss: Tensor, scores: Tensor | None, y: Tensor, *, last: bool = True) -> None:
        """Add a (micro-)batch's mean loss, weighted by its rows; ``last``: the batch's last
        micro-batch, which ends the step (a NaN/Inf loss names the step, not the part)."""
        loss = loss.detach()
        first = self._first_nonfinite
        self._first_nonfinite = torch.where(~torch.isfinite(loss) & (first < 0), self._steps,
                                            first)
        self._steps += int(last)
        self._loss_sum += loss * y.numel()
        if scores is not None:
            self._correct += (scores.argmax(1) == y).sum()
            self._scored += y.numel()
        self._count += y.numel()

    def pop_stats(self) -> dict[str, float | int | None]:
        """Mean loss and accuracy since the last call (accuracy None without a classifier);
        ``nonfinite_at``: steps since the last call before the first NaN/Inf loss, or None."""
        first = int(self._first_nonfinite)  # on CUDA: with the sums below, one sync per epoch
        out = {
            "loss": float(self._loss_sum) / max(self._count, 1),
            "acc": float(self._correct) / self._scored if self._scored else None,
            "nonfinite_at": first if first >= 0 else None,
            "rows": self._count,
            "scored": self._scored,
        }
        self._reset_stats()
        return out

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.spec.name,
            "module": self.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # The state's format depends on the device type (CPU: 5056 bytes, CUDA: 16).
            "generator": {"device": self.device.type, "state": self.generator.get_state()},
            "epoch": self.epoch,
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if state["index"] != self.index or state["name"] != self.spec.name:
            raise ValueError(
                f"checkpoint holds block {state['index']} ({state['name']}) but it is being "
                f"loaded into block {self.index} ({self.spec.name}); the model config differs"
            )
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to our device
        self._load_generator(state["generator"])
        self.set_epoch(state["epoch"])

    def _load_generator(self, saved: Any) -> None:
        """Restore the dropout generator; across device types, reseed it (not exact)."""
        if isinstance(saved, torch.Tensor):  # written before the device type was stored
            saved = {"device": "cpu" if saved.numel() > 16 else "cuda", "state": saved}
        if saved["device"] == self.device.type:
            self.generator.set_state(saved["state"])
            return
        # A CPU generator state cannot become a CUDA one or back. Parameters, buffers and
        # optimiser state are exact; the dropout masks from here on differ from a run that
        # stayed on one device type. Reseed from the block seed and the saved state's bytes, so
        # the new stream is still a pure function of the checkpoint.
        digest = int(saved["state"].to(torch.int64).sum()) + 1_000_003 * len(saved["state"])
        self.generator.manual_seed((self.seed + digest) % (2**63))
        warnings.warn(
            f"block {self.index} ({self.spec.name}): the checkpoint's dropout generator is a "
            f"{saved['device']} state and this block runs on {self.device.type}; parameters and "
            "optimiser state are exact, dropout masks from here on are newly seeded",
            stacklevel=3,
        )


def build_blocks(
    cfg: Config,
    specs: Sequence[BlockSpec],
    num_classes: int,
    indices: Sequence[int],
    device: torch.device | str,
) -> list[LocalBlock]:
    """Build blocks ``indices`` of the model; block i is the same whichever process builds it."""
    stats = dataset_stats(cfg.data) if RULES.get(cfg.rule.name).needs_image else None
    top = end_to_end_top(cfg.rule, len(specs))
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
            context=RuleContext(tuple(specs), i, stats),
            init=cfg.model.init,
            top=top if len(top) > 1 and i in top else None,
        )
        for i in indices
    ]


def _backward(loss: Tensor, part: MicroBatch, y: Tensor) -> None:
    """Backward of a micro-batch's mean loss weighted by its share of the batch's rows, so
    that the gradients accumulated over the batch are those of the batch mean. The whole batch
    is not scaled at all (bitwise what a step without micro-batches computes)."""
    (loss if part.whole else loss * part.weight(y.numel())).backward()


def train_end_to_end(
    blocks: Sequence[LocalBlock], x: Tensor, y: Tensor, *, part: MicroBatch = WHOLE
) -> Tensor:
    """One backprop step of ``blocks`` (contiguous, the output block last) on (x, y).

    The output's cross-entropy (plus, for glob+sim, every hidden block's sim loss) flows back
    through all of them; each block's own optimiser then steps. Used for global rules (every
    block) and for AugLocal's end-to-end top layers. ``part``: as in
    :meth:`LocalBlock.train_step` (gradient accumulation over the micro-batches of a batch).
    """
    losses: list[Tensor] = []
    for block in blocks:
        block.train(True)
        with block.autocast():
            h = block(x.float())
            loss, scores = block.local_loss(h, y)
        losses.append(loss)  # zero for a top block without a loss of its own; glob+sim: sim
        block.record(loss, scores, y, last=part.last)
        x = block.pass_on(h)
    if part.first:
        for block in blocks:
            block.optimizer.zero_grad(set_to_none=True)
    _backward(torch.stack(losses).sum(), part, y)
    if part.last:
        for block in blocks:
            block.optimizer_step(part.batch_rows or y.numel())
    return x.detach()


class Engine:
    """Blocks ``blocks`` (contiguous, in order) of one model, in this process; each training
    batch in ``micro_batches`` micro-batches (``pipeline.micro_batches``)."""

    def __init__(self, blocks: Sequence[LocalBlock], *, micro_batches: int = 1) -> None:
        self.blocks = list(blocks)
        self.micro_batches = micro_batches
        self.device = self.blocks[0].device
        rule = self.blocks[0].rule
        self.is_global = rule is not None and rule.is_global
        self.needs_image = any(b.needs_image for b in self.blocks)
        """Some block's rule needs the model's input image (InfoPro): see :meth:`train`."""
        self._top = self.blocks if self.is_global else [b for b in self.blocks if b.end_to_end]
        """The blocks trained together, end to end, by the output loss (all: a global rule)."""
        self._eval_correct: dict[int, Tensor] = {}
        self._eval_count = 0
        self.grad_sync: GradSync | None = None
        """Set by :meth:`share_gradients`; flushed at the end of every training batch."""

    def share_gradients(self, sync: GradSync) -> None:
        """Every block steps its optimiser through ``sync`` (data-parallel replicas)."""
        self.grad_sync = sync
        for block in self.blocks:
            block.grad_sync = sync

    @property
    def indices(self) -> list[int]:
        return [b.index for b in self.blocks]

    def train_batch(
        self, x: Tensor, y: Tensor, epoch: int, image: Tensor | None = None
    ) -> Tensor:
        """One training step of every block on batch (x, y); returns the last block's output.

        ``image`` is the model's input batch, for rules that need it; an engine starting at
        block 0 takes ``x`` itself, a later pipeline stage receives it with the activation.
        In micro-batches, each goes through every block before the next one starts (as a
        pipeline streams them); the output is the micro-batches' outputs concatenated, which
        an engine over the next blocks splits back into the same micro-batches.
        """
        outs = [self.train_micro(px, py, epoch, pimage, part=part)  # type: ignore[arg-type]
                for part, (px, py, pimage) in split_batch((x, y, image), self.micro_batches)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def train_micro(
        self, x: Tensor, y: Tensor, epoch: int, image: Tensor | None = None, *,
        part: MicroBatch = WHOLE,
    ) -> Tensor:
        """Micro-batch ``part`` of a training batch through every block; returns the last
        block's output. Each block steps after the batch's last micro-batch."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for block in self.blocks:
            block.set_epoch(epoch)
        self._check_top()
        if self.needs_image:
            image = self.input_image(x, image)
        for block in self.blocks[: len(self.blocks) - len(self._top)]:
            x = block.train_step(x, y, image, part=part)
        out = train_end_to_end(self._top, x, y, part=part) if self._top else x
        if part.last and self.grad_sync is not None:  # the last deferred optimiser step
            self.grad_sync.flush()
        return out

    def _check_top(self) -> None:
        """The end-to-end blocks must all be here: a gradient cannot cross two engines."""
        if self.is_global:
            if not self.blocks[-1].is_output or self.blocks[0].index != 0:
                raise RuntimeError("global (backprop) rules need every block in one engine")
            return
        if self._top and [b.index for b in self._top] != list(self._top[0].top or ()):
            top = self._top[0].top
            assert top is not None
            raise RuntimeError(
                f"blocks {top.start}..{top.stop - 1} learn end to end from the output loss, "
                f"but this engine holds blocks {self.indices}; put all of them in one engine "
                "(one stage of pipeline.partition)"
            )

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

    def save(self, ckpt: Path) -> dict[str, str]:
        """Write every block's file; returns {file name: sha256} for the manifest."""
        return {block_file(ckpt, block.index).name:
                save_block_state(ckpt, block.index, block.checkpoint_state())
                for block in self.blocks}

    def load(self, ckpt: Path) -> None:
        for block in self.blocks:
            state = load_block_state(ckpt, block.index)
            try:
                block.load_checkpoint_state(state)
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                # e.g. load_state_dict's many-line size-mismatch report: one line, the file.
                first = str(exc).strip().splitlines()
                reason = " ".join(s.strip() for s in first[:3]) if first else type(exc).__name__
                raise CheckpointError(
                    f"checkpoint file {block_file(ckpt, block.index)} does not fit block "
                    f"{block.index} ({block.spec.name}) of the model described by "
                    f"{Path(ckpt) / 'manifest.json'}: {reason[:300]}; the file was written by "
                    "another model (a manifest edited by hand?): resume with the config it "
                    "was written with, or start a new run"
                ) from exc


def piece_rows(cfg: Config) -> int:
    """Rows of the pipeline's wire and of an evaluation piece: data.batch_size, or with
    micro-batches the largest micro-batch, ceil(data.batch_size / pipeline.micro_batches)."""
    return wire_rows(cfg.data.batch_size, cfg.pipeline.micro_batches)


def eval_pieces(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """An evaluation batch in pieces of ``size`` rows (:func:`piece_rows`; the last one
    shorter), as every path evaluates: the pipeline's wire has that batch size, and cuDNN
    picks kernels by shape, so one piece size keeps GPU results equal between one process and
    a pipeline."""
    for start in range(0, y.numel(), size):
        yield x[start:start + size], y[start:start + size]
