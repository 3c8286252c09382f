"""Data-parallel replicas of the pipeline: R copies of the S stages, R x S ranks.

    rank = replica * S + stage          a pipeline's stages on consecutive ranks
    stage group {r * S + s : r < R}     the gradient all-reduce of stage s's blocks

Each replica trains on its slice of every global batch (:func:`replica_rows`). After a block's
backward, :class:`ReplicaSync` (the engine's gradient hook) launches one all-reduce of the
block's flattened gradients over its stage group, weighted by the replica's rows, and waits for
it just before that block's optimiser step, which it defers until the next block has done its
forward and backward (or the batch ends): the update is the same, the communication hidden.
Batch statistics stay per replica, as in DDP. At each epoch end replica 0's buffers (BatchNorm
running statistics) are broadcast to the other replicas, so evaluation, sharded over them,
counts what one process would; at each checkpoint the replicas compare checksums of their
parameters (:meth:`ReplicaSync.check_same`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipelocal.data.loader import derive_seed
from pipelocal.engine import LocalBlock
from pipelocal.pipeline.channel import PeerError

__all__ = ["ReplicaSync", "ReplicasDiverged", "feed_groups", "layout", "param_checksums",
           "replica_rows", "replica_seed", "replica_slices", "stage_groups"]


class ReplicasDiverged(RuntimeError):
    """The replicas of a stage hold different parameters at a checkpoint."""


def layout(rank: int, stages: int) -> tuple[int, int]:
    """(replica, stage) of ``rank``: rank = replica * stages + stage."""
    return divmod(rank, stages)


def replica_rows(total: int, replicas: int) -> list[int]:
    """Rows of a batch of ``total`` rows per replica, in order: as even as rows allow, the
    first ``total % replicas`` replicas one row more (10 over 4: [3, 3, 2, 2])."""
    base, extra = divmod(total, replicas)
    return [base + (r < extra) for r in range(replicas)]


def replica_slices(total: int, replicas: int) -> list[slice]:
    """The consecutive row ranges of :func:`replica_rows`, replica 0 first."""
    out, start = [], 0
    for rows in replica_rows(total, replicas):
        out.append(slice(start, start + rows))
        start += rows
    return out


def replica_seed(block_seed: int, replica: int, step: int) -> int:
    """Seed of replica ``replica``'s dropout masks of one block at ``step`` (replica > 0; replica
    0 keeps the block's own stream, so one replica is the run without replicas)."""
    return derive_seed("replica-dropout", block_seed, replica, step)


def stage_groups(stages: int, replicas: int, backend: str,
                 timeout: timedelta) -> list[dist.ProcessGroup]:
    """One group per stage, its R replicas' ranks; every rank creates every group, in the same
    order, as ``new_group`` requires."""
    return [dist.new_group([r * stages + s for r in range(replicas)], backend=backend,
                           timeout=timeout) for s in range(stages)]


def feed_groups(stages: int, replicas: int, backend: str,
                timeout: timedelta) -> list[dist.ProcessGroup]:
    """One group per replica r > 0, ranks (0, r * stages): the coordinator sends that replica's
    first stage its rows of every batch and every control message."""
    return [dist.new_group([0, r * stages], backend=backend, timeout=timeout)
            for r in range(1, replicas)]


def param_checksums(blocks: Sequence[LocalBlock]) -> Tensor:
    """int64 [blocks, 2] on the blocks' device: the sum of every parameter byte and the sum
    weighted by position (mod 251), so that one changed bit or two swapped bytes change it."""
    rows = []
    for block in blocks:
        total = torch.zeros(2, dtype=torch.int64, device=block.device)
        for p in block.parameters():
            raw = p.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
            weight = torch.arange(raw.numel(), device=raw.device) % 251 + 1
            total += torch.stack([raw.sum(), (raw * weight).sum()])
        rows.append(total)
    return torch.stack(rows)


class ReplicaSync:
    """The gradient hook of one rank's engine (see :class:`~pipelocal.engine.GradSync`): the
    all-reduce of each block's gradients over its stage's replica group."""

    def __init__(self, group: dist.ProcessGroup, *, replica: int, replicas: int, stage: int,
                 backend: str, timeout_s: float) -> None:
        self.group, self.replica, self.replicas, self.stage = group, replica, replicas, stage
        # NCCL: a wait without a timeout orders the stream only (no host wait); gloo: bounded.
        self._timeout = None if backend == "nccl" else timedelta(seconds=timeout_s)
        self._pending: tuple[LocalBlock, Any, Tensor, list[Tensor]] | None = None

    def begin_step(self, blocks: Sequence[LocalBlock], step: int) -> None:
        """Before a training step: replica > 0 draws its masks from (block, replica, step)."""
        if self.replica:
            for block in blocks:
                block.generator.manual_seed(replica_seed(block.seed, self.replica, step))

    def step(self, block: LocalBlock, rows: int) -> None:
        """In place of ``block.optimizer.step()`` after its backward: launch the all-reduce of
        its gradients, then finish the block before it (its all-reduce overlapped this one's
        forward and backward)."""
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if not grads:  # nothing to average (the same on every replica)
            self.flush()
            block.optimizer.step()
            return
        # One bucket [grad * rows_r ..., rows_r]: its sum is [sum_r grad_r * rows_r ..., B].
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_full((1,), rows)])
        flat[:-1].mul_(rows)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.flush()
        self._pending = (block, work, flat, grads)

    def flush(self) -> None:
        """Wait for the last all-reduce launched, average, and step its block."""
        if self._pending is None:
            return
        block, work, flat, grads = self._pending
        self._pending = None
        self._wait(work, f"gradient all-reduce of block {block.index} ({block.spec.name})")
        avg = flat[:-1].div_(flat[-1:])  # sum_r grad_r * rows_r / B
        offset = 0
        for g in grads:
            g.copy_(avg[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        block.optimizer.step()

    def broadcast_buffers(self, blocks: Sequence[LocalBlock]) -> None:
        """Replica 0's buffers (BatchNorm running statistics) to every replica of the stage."""
        for block in blocks:
            for buf in block.buffers():
                work = dist.broadcast(buf, group_src=0, group=self.group, async_op=True)
                self._wait(work, f"buffer broadcast of block {block.index}")

    def check_same(self, blocks: Sequence[LocalBlock], step: int) -> None:
        """All-gather the parameters' checksums of every replica; a mismatch is an error naming
        the stage and the block (a replica perturbed, or a non-deterministic kernel)."""
        mine = param_checksums(blocks)
        every = [torch.empty_like(mine) for _ in range(self.replicas)]
        self._wait(dist.all_gather(every, mine, group=self.group, async_op=True),
                   "parameter checksum all-gather")
        every = [t.cpu() for t in every]  # at a checkpoint only: a host sync is fine here
        for row, block in enumerate(blocks):
            sums = [tuple(t[row].tolist()) for t in every]
            differ = [r for r, s in enumerate(sums) if s != sums[0]]
            if differ:
                raise ReplicasDiverged(
                    f"stage {self.stage}: the replicas hold different parameters of block "
                    f"{block.index} ({block.spec.name}) at the checkpoint of step {step}: "
                    f"replica(s) {differ} differ from replica 0 (checksums {sums}); their "
                    "gradients are averaged, so they must stay equal: a replica was changed "
                    "from outside, or a kernel is not deterministic (run.deterministic)")

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self._timeout is None:
                work.wait()
            else:
                work.wait(self._timeout)
        except Exception as exc:
            raise PeerError(
                f"stage {self.stage}, replica {self.replica}: {what} failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "another replica of this stage has most likely failed or been stopped first"
            ) from exc
