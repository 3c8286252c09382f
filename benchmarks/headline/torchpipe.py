"""Peer (d): backprop pipelined by ``torch.distributed.pipelining``, and the transport benchmark.

S processes (forked as pipelocal forks its workers; gloo, CPU, a free port chosen at runtime),
one per stage, each holding the same blocks as the pipelocal stage of the same split: stage k's
module is ``nn.Sequential`` of its blocks' ``body`` + ``pass_on`` (the last one ends in the output
layer, trained with cross-entropy), built with ``rule.name = glob`` so that no local head
exists. Each block keeps its own optimiser (the same Adam as every other peer), stepped after
``schedule.step``. For every (schedule, micro-batches) setting in turn: W warm-up steps, then N
timed steps; samples/s = N * batch / wall time of the N steps (barriers on both sides).

Per stage and setting: busy fraction = process CPU seconds / (wall * threads) (with one thread
per stage the compute thread; gloo's own threads count as busy too), the saved-for-backward peak
(a :class:`memory.SavedTensorMeter` around the steps), parameter/gradient/optimiser bytes and
the process's peak RSS so far (one process serves every setting in turn, so RSS is a running
maximum; the activation figure is per setting).

Transport (ranks 0 and 1, before the settings): a gloo isend/irecv ping-pong of a float32
tensor of ``wire_bytes`` (one-way time = round trip / 2) and of a 4-byte one (latency), against
``dst.copy_(src)`` of the same size in one process.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.headline.memory import SavedTensorMeter, peak_rss_mib, state_bytes
from benchmarks.headline.peers import bind_like_a_stage, build_all
from pipelocal.config import Config
from pipelocal.engine import LocalBlock
from pipelocal.launch.spawn import START_METHOD, worker_context

__all__ = ["BlockChain", "free_port", "join_peers", "run_torchpipe", "spawn_ranks", "timed_steps",
           "transport"]

SCHEDULES = ("gpipe", "1f1b")


class BlockChain(nn.Module):
    """Blocks in order as one module: ``pass_on(body(x))`` each, as under backprop."""

    def __init__(self, blocks: list[LocalBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block.pass_on(block.body(x))
        return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def _timed(fn: Any, n: int) -> float:
    """Median seconds of n calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def transport(rank: int, wire_bytes: int, rounds: int) -> dict[str, Any] | None:
    """gloo ping-pong between ranks 0 and 1 vs a plain copy; rank 0 returns the figures."""
    def pingpong(t: Tensor) -> None:
        if rank == 0:
            dist.isend(t, 1).wait()
            dist.irecv(t, 1).wait()
        else:
            dist.irecv(t, 0).wait()
            dist.isend(t, 0).wait()

    big = torch.zeros(max(1, wire_bytes // 4))  # float32
    small = torch.zeros(1)
    for t in (big, small):
        pingpong(t)  # warm-up: connection set-up
    one_way = _timed(lambda: pingpong(big), rounds) / 2
    latency = _timed(lambda: pingpong(small), rounds) / 2
    if rank != 0:
        return None
    dst = torch.empty_like(big)
    copy = _timed(lambda: dst.copy_(big), rounds)
    nbytes = big.numel() * 4
    return {
        "bytes": nbytes,
        "gloo_one_way(s)": one_way,
        "gloo_latency(s)": latency,
        "gloo(GB/s)": nbytes / one_way / 1e9,
        "gloo_minus_latency(GB/s)": nbytes / max(one_way - latency, 1e-9) / 1e9,
        "copy(s)": copy,
        "copy(GB/s)": nbytes / copy / 1e9,
        "gloo_vs_copy": (nbytes / one_way) / (nbytes / copy),
    }


def _setting(cfg: Config, stage: Any, blocks: list[LocalBlock], batches: list[tuple[Tensor,
             Tensor]], schedule: str, m: int, warmup: int, steps: int) -> dict[str, Any]:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = cls(stage, m, loss_fn=_loss)
    rank, world = dist.get_rank(), dist.get_world_size()
    losses: list[Tensor] = []

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        for b in blocks:
            b.optimizer.zero_grad(set_to_none=True)
        losses.clear()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        for b in blocks:
            b.optimizer.step()

    return {
        "schedule": schedule,
        "microbatches": m,
        **timed_steps(step, blocks, warmup=warmup, steps=steps, batch=cfg.data.batch_size),
        "last_losses": [float(v.detach()) for v in losses],
    }


def timed_steps(step: Any, blocks: list[LocalBlock], *, warmup: int, steps: int,
                batch: int) -> dict[str, Any]:
    """``step(i)`` for W warm-up then N timed steps on every rank (barriers on both sides):
    samples/s of the global ``batch``, busy fraction, saved-for-backward peak, state bytes,
    peak RSS."""
    for i in range(warmup):
        step(i)
    dist.barrier()
    meter = SavedTensorMeter(blocks)
    t0, c0 = time.perf_counter(), time.process_time()
    with meter:
        for i in range(warmup, warmup + steps):
            step(i)
    cpu = time.process_time() - c0
    dist.barrier()
    wall = time.perf_counter() - t0
    return {
        "throughput(samples/s)": steps * batch / wall,
        "wall(s)": wall,
        "busy_fraction": cpu / (wall * torch.get_num_threads()),
        "activation_peak(B)": meter.peak,
        **state_bytes(blocks, [b.optimizer for b in blocks]),
        "peak_rss(MiB)": peak_rss_mib(),
    }


def _worker(rank: int, world: int, port: int, out_dir: str, cfg: Config,
            partition: list[int], settings: list[tuple[str, int]], warmup: int, steps: int,
            threads: int, transport_rounds: int) -> None:
    from torch.distributed.pipelining import PipelineStage

    blocks, batches = join_peers(rank, world, port, cfg, threads)
    try:
        start = sum(partition[:rank])
        mine = blocks[start:start + partition[rank]]
        wire = blocks[start + partition[rank] - 1].spec.wire_shape if rank < world - 1 else ()
        bytes_out = cfg.data.batch_size * 4 * int(torch.Size(wire).numel()) if wire else 0
        link = dist.get_world_size() > 1 and transport_rounds > 0
        # Rank 0 sends its output, whose size rank 1 does not know: take it from rank 0.
        size = torch.tensor([bytes_out])
        dist.broadcast(size, 0)
        result: dict[str, Any] = {
            "rank": rank,
            "blocks": [b.spec.name for b in mine],
            "transport": transport(rank, int(size), transport_rounds) if link and rank < 2
            else None,
        }
        stage = PipelineStage(BlockChain(mine), rank, world, torch.device("cpu"))
        result["settings"] = [
            _setting(cfg, stage, mine, batches, s, m, warmup, steps) for s, m in settings
        ]
        result["threads"] = torch.get_num_threads()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_torchpipe(
    cfg: Config,
    partition: list[int],
    settings: list[tuple[str, int]],
    *,
    warmup: int,
    steps: int,
    threads: int,
    transport_rounds: int = 20,
) -> list[dict[str, Any]]:
    """Run (d) for each (schedule, micro-batches) setting; one result dict per rank."""
    for s, m in settings:
        if s not in SCHEDULES or m < 1 or cfg.data.batch_size % m:
            raise ValueError(
                f"setting ({s!r}, {m}) is invalid; accepted: schedule in {SCHEDULES} and a "
                f"micro-batch count that divides the batch size {cfg.data.batch_size}"
            )
    return spawn_ranks(_worker, len(partition), cfg, partition, settings, warmup, steps,
                       threads, transport_rounds)


def join_peers(rank: int, world: int, port: int, cfg: Config,
               threads: int) -> tuple[list[LocalBlock], list[tuple[Tensor, Tensor]]]:
    """A peer's rank: its threads and cores (bound as pipelocal binds a stage, with
    ``pipeline.bind_cpus``), the gloo group, and every block built for backprop
    (``rule.name = glob``) with the training batches."""
    bind_like_a_stage(cfg, rank, world, threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=cfg.pipeline.timeout_s))
    return build_all(cfg.replace(rule={"name": "glob"}))


def spawn_ranks(worker: Any, world: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, port, out_dir, *args)`` in ``world`` processes started as
    pipelocal starts its workers (a free port for their gloo group); each saves its result as
    ``out_dir/rank<r>.pt``."""
    saved_path = os.environ.get("PYTHONPATH")
    # Spawned children must find this module and its siblings (memory, peers) by name.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved_path) if p)
    try:
        with tempfile.TemporaryDirectory(prefix="peer-") as out:
            worker_context()
            mp.start_processes(worker, args=(world, free_port(), out, *args), nprocs=world,
                               join=True, start_method=START_METHOD)
            return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False)
                    for r in range(world)]
    finally:
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
