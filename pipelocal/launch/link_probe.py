"""Measuring the link the planner needs on this machine: two processes on gloo (as CPU stages
and replicas talk) time a point-to-point round trip of a large and of a 4-byte tensor, and an
all-reduce of the large one."""

from __future__ import annotations

import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from pipelocal.launch.spawn import START_METHOD, worker_context
from pipelocal.pipeline.layout import Link

__all__ = ["measure_link"]

_BYTES = 4 << 20
_ROUNDS = 10


def _median(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return sorted(times)[rounds // 2]


def _rank(rank: int, port: int, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        big, small = torch.zeros(_BYTES // 4), torch.zeros(1)
        peer = 1 - rank

        def pingpong(t: torch.Tensor) -> None:
            if rank == 0:
                dist.send(t, peer)
                dist.recv(t, peer)
            else:
                dist.recv(t, peer)
                dist.send(t, peer)

        for t in (big, small):
            pingpong(t)  # connection set-up
        dist.all_reduce(big)
        one_way = _median(lambda: pingpong(big), _ROUNDS) / 2
        latency = _median(lambda: pingpong(small), _ROUNDS) / 2
        reduce_s = _median(lambda: dist.all_reduce(big), _ROUNDS)
        if rank == 0:
            # Ring over 2 ranks: 2 (R - 1) / R = 1 times the bytes, and 2 latencies.
            link = Link(p2p_bytes_s=_BYTES / max(one_way - latency, 1e-9), latency_s=latency,
                        allreduce_bytes_s=_BYTES / max(reduce_s - 2 * latency, 1e-9))
            torch.save(link, Path(out) / "link.pt")
    finally:
        dist.destroy_process_group()


def measure_link(threads: int = 1) -> Link:
    """The gloo link between two processes of this machine (a few seconds)."""
    probe = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    port = probe.port
    del probe  # frees the port for the ranks' own store
    worker_context()
    with tempfile.TemporaryDirectory(prefix="pipelocal-link-") as out:
        tmp.start_processes(_rank, args=(port, out, threads), nprocs=2, join=True,
                            start_method=START_METHOD)
        return torch.load(Path(out) / "link.pt", weights_only=False)

