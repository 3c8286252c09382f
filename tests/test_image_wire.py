"""The input image on the wire (InfoPro): it arrives with each message; its cost in bytes."""

from __future__ import annotations

import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipelocal.pipeline.channel import Kind, Message, P2PChannel
from tests.conftest import run_two_ranks

SHAPE, IMAGE, BATCH = (3, 2), (1, 4, 4), 4


def _run(rank: int, port: int, image: bool, out: Any) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        ch = P2PChannel(
            stage=rank, batch_size=BATCH, wire_shape_in=SHAPE if rank else None,
            wire_shape_out=None if rank else SHAPE, wire_dtype=torch.float32, depth=2,
            timeout_s=20.0, device=torch.device("cpu"), image_shape=IMAGE if image else None,
        )
        if rank == 0:
            for step, rows in enumerate((4, 3)):
                img = torch.arange(rows * 16, dtype=torch.float32).reshape(rows, *IMAGE) + step
                ch.send(Message(Kind.TRAIN, step, 0, torch.ones(rows, *SHAPE),
                                torch.zeros(rows, dtype=torch.int64), img))
            ch.flush()
            out.put((rank, ch.sent_bytes))
        else:
            got = [ch.recv() for _ in range(2)]
            out.put((rank, [None if m.image is None else m.image.tolist() for m in got]))
    except BaseException:
        out.put((rank, traceback.format_exc()))


def _spawn(image: bool) -> dict[int, Any]:
    return run_two_ranks(_run, image)


def test_image_arrives_with_the_activation_and_costs_its_bytes() -> None:
    with_image, without = _spawn(True), _spawn(False)
    assert without[1] == [None, None]
    for step, rows in enumerate((4, 3)):
        want = torch.arange(rows * 16, dtype=torch.float32).reshape(rows, *IMAGE) + step
        assert torch.equal(torch.tensor(with_image[1][step]), want)
    # Per message: header int64 [8] + x float32 [4, 3, 2] + y int64 [4] (+ image [4, 1, 4, 4]).
    assert without[0] == 2 * (8 * 8 + BATCH * 6 * 4 + BATCH * 8)
    assert with_image[0] - without[0] == 2 * BATCH * 16 * 4  # float32 image, padded batch
