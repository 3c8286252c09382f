"""Peer (e): backprop over R data-parallel ranks with ``DistributedDataParallel``.

R processes (forked as pipelocal forks its workers; gloo, CPU, a free port chosen at runtime),
each holding the whole model as :class:`~benchmarks.headline.torchpipe.BlockChain` of every
block built with ``rule.name = glob`` (no local head), wrapped in DDP. Each rank trains on its
contiguous slice of every global batch (``data.batch_size`` rows; the slices as even as rows
allow), DDP averages the gradients across ranks (its buckets all-reduced while the backward pass
runs), and each block's own optimiser (the same Adam as every other peer) steps. W warm-up
steps, then N timed steps; samples/s = N * global batch / wall time of the N steps (barriers on
both sides).

Per rank: busy fraction = process CPU seconds / (wall * threads) (gloo's threads count as busy
too), the saved-for-backward peak (a :class:`memory.SavedTensorMeter` around the timed steps),
parameter/gradient/optimiser bytes, the process's peak RSS, and the global batch's losses (the
mean of the ranks' slice losses weighted by rows) for the correctness test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmarks.headline.torchpipe import BlockChain, join_peers, spawn_ranks, timed_steps
from pipelocal.config import Config
from pipelocal.pipeline.replicas import replica_slices

__all__ = ["run_ddp"]


def _worker(rank: int, world: int, port: int, out_dir: str, cfg: Config, warmup: int,
            steps: int, threads: int) -> None:
    blocks, batches = join_peers(rank, world, port, cfg, threads)
    try:
        model = DistributedDataParallel(BlockChain(blocks))
        rows = replica_slices(cfg.data.batch_size, world)[rank]  # as pipelocal's replicas
        share = (rows.stop - rows.start) / cfg.data.batch_size
        losses: list[torch.Tensor] = []

        def step(i: int) -> None:
            x, y = batches[i % len(batches)]
            for b in blocks:
                b.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            # DDP averages over ranks; weighting each rank's mean by its share of rows (times
            # the rank count) makes that average the global batch's mean for uneven slices too.
            (loss * share * world).backward()
            losses.append(loss.detach() * share)  # summed over the ranks after the timing
            for b in blocks:
                b.optimizer.step()

        result = {
            "rank": rank,
            "rows": rows.stop - rows.start,
            **timed_steps(step, blocks, warmup=warmup, steps=steps, batch=cfg.data.batch_size),
            "losses": _global(losses),
            "threads": torch.get_num_threads(),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _global(losses: list[torch.Tensor]) -> list[float]:
    """The global batch's losses: the ranks' row-weighted slice losses, summed."""
    total = torch.stack(losses)
    dist.all_reduce(total)
    return total.tolist()


def run_ddp(cfg: Config, replicas: int, *, warmup: int, steps: int,
            threads: int) -> list[dict[str, Any]]:
    """Run (e) over ``replicas`` ranks; one result dict per rank."""
    if not 1 <= replicas <= cfg.data.batch_size:
        raise ValueError(f"replicas = {replicas} is invalid; accepted: 1 .. the batch size "
                         f"{cfg.data.batch_size}")
    return spawn_ranks(_worker, replicas, cfg, warmup, steps, threads)
