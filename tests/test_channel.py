"""P2P channel on a real 2-process gloo group: padding, dtypes, ordering, bounded waits."""

from __future__ import annotations

import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipelocal.microbatch import WHOLE, MicroBatch
from pipelocal.pipeline.channel import Kind, Message, P2PChannel, PeerError
from tests.conftest import run_two_ranks

SHAPE = (3, 2)


def _channel(rank: int, dtype: torch.dtype, timeout_s: float = 20.0) -> P2PChannel:
    return P2PChannel(
        stage=rank, batch_size=4, wire_shape_in=SHAPE if rank == 1 else None,
        wire_shape_out=SHAPE if rank == 0 else None, wire_dtype=dtype, depth=2,
        timeout_s=timeout_s, device=torch.device("cpu"),
    )


def _run(rank: int, port: int, dtype_name: str, scenario: str, out: Any) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        dtype = getattr(torch, dtype_name)
        ch = _channel(rank, dtype, timeout_s=1.0 if scenario == "timeout" else 20.0)
        if scenario == "stop":  # the end-of-run protocol: STOP, its trailers, nothing posted
            if rank == 0:
                ch.send(Message(Kind.TRAIN, 0, 0, torch.ones(4, *SHAPE), torch.zeros(4).long()))
                ch.send(Message(Kind.STOP))
                ch.close()
                out.put((rank, ch.in_flight))
            else:
                kinds = [ch.recv().kind, ch.recv().kind]
                posted_before = ch.posted
                ch.drain()
                out.put((rank, ([int(k) for k in kinds], posted_before, ch.posted)))
            dist.destroy_process_group()
            return
        if rank == 0:
            if scenario == "timeout":
                store.wait(["done"], timedelta(seconds=30))  # send nothing; wait for the peer
            else:
                for step in range(5):
                    rows = 4 if step < 4 else 3
                    x = torch.arange(rows * 6, dtype=torch.float32).reshape(rows, *SHAPE) + step
                    part = MicroBatch(step % 2, 2, 8) if step < 4 else WHOLE
                    ch.send(Message(Kind.TRAIN, step, 7, x, torch.full((rows,), step),
                                    part=part))
                ch.send(Message(Kind.END_EPOCH, -1, 7))
                ch.flush()
            out.put((rank, "ok"))
        else:
            got = []
            try:
                for _ in range(6):
                    m = ch.recv()
                    # Plain lists: tensors would cross the queue as this process's shared memory.
                    got.append((int(m.kind), m.step, m.epoch, m.rows, m.x.tolist(), m.y.tolist(),
                                (m.part.index, m.part.count, m.part.batch_rows)))
                out.put((rank, got))
            except PeerError as exc:
                out.put((rank, f"PeerError: {exc}"))
            store.set("done", "1")
    except BaseException:
        out.put((rank, traceback.format_exc()))


def _spawn(dtype_name: str, scenario: str) -> dict[int, Any]:
    return run_two_ranks(_run, dtype_name, scenario)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_messages_arrive_in_order_with_padding_removed(dtype_name: str) -> None:
    results = _spawn(dtype_name, "normal")
    assert results[0] == "ok"
    got = results[1]
    assert isinstance(got, list), got
    for step, (kind, s, epoch, rows, x, y, part) in enumerate(got[:5]):
        want_rows = 4 if step < 4 else 3
        want = torch.arange(want_rows * 6, dtype=torch.float32).reshape(want_rows, *SHAPE) + step
        assert (kind, s, epoch, rows) == (int(Kind.TRAIN), step, 7, want_rows)
        exact = want.to(getattr(torch, dtype_name)).float()  # what survives the wire dtype
        assert torch.equal(torch.tensor(x), exact)
        assert y == [step] * want_rows
        assert part == ((step % 2, 2, 8) if step < 4 else (0, 1, 0))  # the micro-batch
    assert got[5][:4] == (int(Kind.END_EPOCH), -1, 7, 0)


def test_receive_times_out_with_a_clear_error() -> None:
    results = _spawn("float32", "timeout")
    assert isinstance(results[1], str) and results[1].startswith("PeerError"), results[1]
    assert "stage 1: receive from stage 0 failed" in results[1]
    assert "pipeline.timeout_s = 1" in results[1]


def test_stop_leaves_nothing_posted() -> None:
    """After STOP the receiver still has depth - 1 receives posted; the trailers match them."""
    results = _spawn("float32", "stop")
    assert results[0] == 0, results[0]  # every send delivered
    kinds, posted_before, posted_after = results[1]
    assert kinds == [int(Kind.TRAIN), int(Kind.STOP)]
    assert posted_before == 1  # depth 2: one receive posted ahead would never be matched ...
    assert posted_after == 0  # ... without the trailer
