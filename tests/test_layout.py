"""The layout planner (pipelocal.pipeline.layout, ``pipelocal plan --devices N``): its model on
hand-made block costs, the --link syntax, and the command on this CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelocal.cli import main
from pipelocal.pipeline.balance import BlockProfile
from pipelocal.pipeline.layout import (
    Costs,
    Link,
    allreduce_s,
    largest_slice,
    plan_layouts,
    predict_ddp,
    predict_layout,
)
from tests.conftest import tiny_overrides

# 1 GB/s both ways, no latency: seconds = gigabytes.
_LINK = Link(p2p_bytes_s=1e9, latency_s=0.0, allreduce_bytes_s=1e9)


def _costs(times: list[float], params: list[int], *, act: int = 0, rows: int = 8,
           backprop_s: float = 0.0) -> Costs:
    blocks = [BlockProfile(f"b{i}", t, act, 4 * p, 1, p) for i, (t, p) in
              enumerate(zip(times, params))]
    return Costs(rows, blocks, params, backprop_s or sum(times))


def test_ring_allreduce_time() -> None:
    link = Link(p2p_bytes_s=1e9, latency_s=1e-3, allreduce_bytes_s=1e9)
    assert allreduce_s(10**9, 1, link) == 0.0
    assert allreduce_s(10**9, 2, link) == pytest.approx(1.0 + 2e-3)  # 2 (R-1)/R = 1
    assert allreduce_s(10**9, 4, link) == pytest.approx(1.5 + 6e-3)


def test_stages_split_the_compute() -> None:
    costs = _costs([1.0, 1.0], [0, 0])
    assert predict_layout(costs, batch=8, replicas=1, partition=[2], link=_LINK).samples_s == 4
    two = predict_layout(costs, batch=8, replicas=1, partition=[1, 1], link=_LINK)
    assert two.samples_s == 8 and two.stage_s == [1.0, 1.0]


@pytest.mark.parametrize(("gigabytes", "cycle"), [
    (0.5, 2.5),  # block 0's all-reduce hides behind block 1; block 1's is exposed
    (1.5, 4.0),  # they queue on the link: 1..2.5, then 2.5..4
])
def test_allreduces_queue_and_overlap_the_blocks_after_them(gigabytes: float,
                                                            cycle: float) -> None:
    costs = _costs([1.0, 1.0], [int(gigabytes * 1e9)] * 2)  # R = 2: one times the bytes
    lay = predict_layout(costs, batch=8, replicas=2, partition=[2], link=_LINK)
    assert lay.stage_s == [pytest.approx(cycle)]


def test_shared_cores_bound_the_cycle() -> None:
    costs = _costs([1.0, 1.0], [0, 0])
    lay = predict_layout(costs, batch=8, replicas=2, partition=[1, 1], link=_LINK, concurrent=2)
    assert lay.stage_s == [2.0, 2.0]  # 4 processes' 4 s of work on 2 cores


def test_transfers_bound_a_stage_and_memory_counts_the_receive_buffers() -> None:
    costs = _costs([1.0, 1.0], [0, 0], act=3 * 10**9)
    lay = predict_layout(costs, batch=8, replicas=1, partition=[1, 1], link=_LINK,
                         channel_depth=2)
    assert lay.stage_s == [3.0, 3.0]
    assert lay.memory_bytes == 1 + 2 * 3 * 10**9  # stage 1: its block and 2 buffers


def test_ddp_overlaps_its_allreduce_with_the_backward_pass() -> None:
    costs = _costs([1.0, 2.0], [10**9, 10**9], backprop_s=3.0)
    ddp = predict_ddp(costs, batch=6, replicas=2, link=_LINK)  # 2 GB in 2 s of backward
    assert ddp.stage_s == [pytest.approx(3.0)]
    slow = predict_ddp(costs, batch=6, replicas=2, link=Link(1e9, 0.0, 0.5e9))
    assert slow.stage_s == [pytest.approx(3.0 + 4.0 - 2.0)]


def test_every_layout_up_to_n_devices_best_first() -> None:
    costs = {rows: _costs([rows / 8] * 4, [0] * 4, rows=rows) for rows in (8, 4, 3, 2)}
    layouts = plan_layouts(costs, batch=8, devices=4, link=_LINK, max_stages=4)
    assert {(lay.replicas, lay.stages) for lay in layouts} == {
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)}
    assert [lay.samples_s for lay in layouts] == sorted(
        (lay.samples_s for lay in layouts), reverse=True)
    assert largest_slice(8, 3) == 3


@pytest.mark.parametrize(("text", "error"), [
    ("p2p=10GB/s,latency=5us", "lacks allreduce"),
    ("p2p=fast,latency=5us,allreduce=1GB/s", "'p2p=fast' is invalid"),
    ("p2p=0GB/s,latency=5us,allreduce=1GB/s", "must be > 0"),
])
def test_link_syntax(text: str, error: str) -> None:
    link = Link.parse("p2p=10GB/s, latency=5us, allreduce=800MB/s")
    assert (link.p2p_bytes_s, link.latency_s, link.allreduce_bytes_s) == pytest.approx(
        (1e10, 5e-6, 8e8))
    with pytest.raises(ValueError, match=error):
        Link.parse(text)


@pytest.mark.parametrize("link", ["p2p=2GB/s,latency=50us,allreduce=1GB/s", ""])
def test_plan_devices_on_this_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  link: str) -> None:
    """N = 4 with a given link, N = 2 with the link measured here (two processes)."""
    devices = 4 if link else 2
    sets = [f"--set={s}" for s in tiny_overrides(tmp_path)]
    args = ["plan", "--devices", str(devices), *(["--link", link] if link else []), *sets]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{devices} device(s)" in out and ("measured here" in out) != bool(link)
    rows = [line.split()[0:2] for line in out.splitlines()
            if line.startswith(("R=", "DDP"))]
    assert ["DDP", f"R={devices}"] in rows
    assert len(rows) == min(5, {4: 8, 2: 3}[devices]) + 1
    assert "predicted best:" in out and "use it: pipelocal train --replicas" in out
