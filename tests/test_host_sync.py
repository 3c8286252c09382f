"""What a GPU stage waits for on the host, checked on the CPU.

A GPU stage runs ahead of its device only if the per-batch path never makes the host wait: no
value read back from the device, no copy from pageable host memory, no NCCL wait with a timeout
(which blocks the CPU thread). The path runs here over fake CUDA tensors (pipelocal.cuda_ops)
with a transport that records how each transfer is waited for.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.utils.stateless import _reparametrize_module

from pipelocal.cuda_ops import OpRecorder, fake_cuda_autocast
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model
from pipelocal.pipeline.channel import Kind, Message, P2PChannel, tensor_wait_timeout
from pipelocal.pipeline.pipe import DistPipe
from pipelocal.pipeline.stage import Stage
from tests.conftest import tiny_config


class _Work:
    def __init__(self, log: list, what: tuple) -> None:
        self.log, self.what = log, what

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.log.append((*self.what, timeout))
        return True


class _Recording:
    """A transport that completes everything at once and logs each wait (op, tag, timeout)."""

    def __init__(self) -> None:
        self.waits: list[tuple[str, int, timedelta | None]] = []

    def isend(self, tensor: torch.Tensor, dst: int, group: Any, tag: int) -> _Work:
        return _Work(self.waits, ("send", tag))

    def irecv(self, tensor: torch.Tensor, src: int, group: Any, tag: int) -> _Work:
        tensor.zero_()  # "received": a TRAIN header of 0 rows
        return _Work(self.waits, ("recv", tag))


def test_tensor_waits_have_no_timeout_on_nccl_only() -> None:
    t = timedelta(seconds=5)
    assert tensor_wait_timeout("nccl", t) is None
    assert tensor_wait_timeout("gloo", t) == t


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_channel_waits_on_the_host_only_for_headers_on_nccl(backend: str) -> None:
    t = _Recording()
    wire = dict(stage=1, batch_size=4, wire_dtype=torch.float32, depth=2, timeout_s=5.0,
                device=torch.device("cpu"), data_backend=backend, transport=t)
    outbox = P2PChannel(wire_shape_in=None, wire_shape_out=(3,), **wire)
    outbox.send(Message(Kind.TRAIN, 0, 0, torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)))
    outbox.flush()
    inbox = P2PChannel(wire_shape_in=(3,), wire_shape_out=None, **wire)
    inbox.recv()
    tensor_timeout = None if backend == "nccl" else timedelta(seconds=5)
    for op in ("send", "recv"):
        waits = [(tag, timeout) for o, tag, timeout in t.waits if o == op]
        assert waits == [(0, timedelta(seconds=5)), (1, tensor_timeout), (2, tensor_timeout)]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_stage_zero_batch_path_never_waits_for_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, micro_batches: int
) -> None:
    """Stage 0 of two on a (fake) GPU: a training and an evaluation batch from host memory, the
    blocks' steps and the send (one per micro-batch); the backward, which needs a real device,
    is left out."""
    cfg = tiny_config(tmp_path, *(["rule.name=pred"] if micro_batches > 1 else []))
    specs = build_model(cfg.model, (1, 8, 8), 10)
    engine = Engine(build_blocks(cfg, specs, 10, [0, 1], "cpu"), micro_batches=micro_batches)
    stage = Stage(0, engine, inbox=None, outbox=None, control=None, run_dir=tmp_path)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)
    x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 10  # host memory, as from the loader
    with fake_cuda_autocast(None) as mode, contextlib.ExitStack() as stack:
        cuda = torch.device("cuda")
        for block in engine.blocks:
            state = {**dict(block.named_parameters()), **dict(block.named_buffers())}
            stack.enter_context(_reparametrize_module(
                block, {k: mode.from_tensor(v).to(cuda) for k, v in state.items()}))
            block.device, block.generator = cuda, None
            block._reset_stats()
        engine.device = cuda
        transport = _Recording()
        stage.outbox = P2PChannel(stage=0, batch_size=64 // micro_batches, wire_shape_in=None,
                                  wire_shape_out=specs[1].wire_shape, wire_dtype=torch.float32,
                                  depth=2, timeout_s=5.0, device=cuda, data_backend="nccl",
                                  transport=transport)
        with OpRecorder() as rec:
            DistPipe(stage, num_stages=2, wire_batch=64).train_batch(0, 0, x, y)
            stage.handle(Message(Kind.EVAL, -1, -1, x[:10], y[:10]))
            stage.outbox.flush()
    assert rec.ops
    assert rec.syncs == [] and rec.copies == []
    tensor_waits = [timeout for _, tag, timeout in transport.waits if tag != 0]
    assert tensor_waits == [None] * 2 * (micro_batches + 1)  # x and y of each message
