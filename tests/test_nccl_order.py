"""NCCL's in-order completion of point-to-point ops, emulated over gloo (pipelocal.pipeline.
nccl_order): the channel layout that would deadlock on GPUs times out here, the per-edge layout
the workers use finishes. Three real processes; every wait is bounded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch

from pipelocal.pipeline.channel import Kind, Message, P2PChannel, PeerError
from pipelocal.pipeline.nccl_order import SerialTransport

pytestmark = pytest.mark.slow
_TIMEOUT_S = 8.0


def _rank(rank: int, port: int, layout: str, out: Any) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 3, rank == 0, timeout=timedelta(seconds=60))
    timeout = timedelta(seconds=_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    headers = dist.new_group(backend="gloo", timeout=timeout)
    edges = [dist.new_group([s, s + 1], backend="gloo", timeout=timeout) for s in range(2)]
    # "shared": every tensor over the default group, one communicator for both directions.
    data = [None, None] if layout == "shared" else edges
    serial = {id(None), *(id(e) for e in edges)}
    wire = dict(stage=rank, batch_size=4, wire_dtype=torch.float32, depth=2,
                timeout_s=_TIMEOUT_S, device=torch.device("cpu"), header_group=headers,
                transport=SerialTransport(lambda g: id(g) in serial))
    inbox = P2PChannel(wire_shape_in=(3,), wire_shape_out=None, data_group=data[rank - 1],
                       **wire) if rank > 0 else None
    outbox = P2PChannel(wire_shape_in=None, wire_shape_out=(3,), data_group=data[min(rank, 1)],
                        **wire) if rank < 2 else None
    try:
        if rank == 0:
            for step in range(3):
                outbox.send(Message(Kind.TRAIN, step, 0, torch.full((4, 3), float(step)),
                                    torch.arange(4)))
            outbox.send(Message(Kind.END_EPOCH, -1, 0))
        else:
            while (msg := inbox.recv()).kind != Kind.END_EPOCH:
                if outbox is not None:
                    outbox.send(Message(msg.kind, msg.step, 0, msg.x + 1, msg.y))
            if outbox is not None:
                outbox.send(Message(Kind.END_EPOCH, -1, 0))
        gathered: list[Any] | None = [None] * 3 if rank == 0 else None
        dist.gather_object(rank, gathered, dst=0, group=control)  # the end-of-epoch gather
        if outbox is not None:
            outbox.send(Message(Kind.STOP))
            outbox.close()
        if inbox is not None:
            assert inbox.recv().kind == Kind.STOP
            inbox.drain()
        out.put((rank, "finished"))
    except (PeerError, RuntimeError) as exc:
        out.put((rank, f"failed: {str(exc).splitlines()[0]}"))
    finally:
        import os

        out.close()
        out.join_thread()  # the result reaches the parent before the hard exit
        os._exit(0)  # a timed-out rank leaves gloo ops behind: exit without tearing down


def _run_three(layout: str) -> dict[int, str]:
    import torch.distributed as dist

    probe = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    port = probe.port
    del probe
    from pipelocal.launch.spawn import worker_context

    ctx = worker_context()  # the launcher's: one forkserver for the whole session
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, layout, out)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        return dict(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_one_communicator_for_both_directions_hangs_at_the_epoch_end() -> None:
    """The middle stage posted the receive of message m + 1 before sending message m on: in
    NCCL order END_EPOCH waits behind a receive that only comes after the gather."""
    results = _run_three("shared")
    assert any("failed" in r for r in results.values()), results
    assert "failed" in results[1] or "failed" in results[2], results


def test_one_communicator_per_edge_finishes() -> None:
    assert _run_three("edges") == {0: "finished", 1: "finished", 2: "finished"}
