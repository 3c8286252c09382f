"""The headline benchmark's measurement helpers (benchmarks/): memory, scaling model, peer (d).

Timings are not tested; what turns them into figures is.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.__main__ import BENCHMARKS
from benchmarks.headline.memory import SavedTensorMeter, state_bytes
from benchmarks.headline.scaling import (
    BlockCost,
    Link,
    predict_backprop,
    predict_pipelocal,
    predict_torchpipe,
)

F32 = 4  # bytes


def test_saved_bytes_match_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)  # no grad: saved only as the first matmul's input
    with SavedTensorMeter([model]) as meter:
        loss = model(x).sum()
        # Linear(4,3) saves x [5,4]; ReLU saves its output [5,3], which Linear(3,2) saves as
        # its input too (one storage, counted once); sum saves nothing. Weights are excluded.
        expected = F32 * (5 * 4 + 5 * 3)
        assert meter.live == expected
        loss.backward()
        del loss
    assert meter.peak == expected
    assert meter.live == 0  # released by backward


def test_saved_bytes_count_parameters_when_not_excluded():
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        out = lin(x).sum()
    # x (for the weight's gradient) and the weight (for x's gradient).
    assert meter.peak == F32 * (2 * 4 + 3 * 4)
    out.backward()


def test_state_bytes_after_an_adam_step():
    lin = nn.Linear(10, 5)  # 55 parameters
    opt = torch.optim.Adam(lin.parameters())
    assert state_bytes([lin], [opt]) == {"params(B)": 220, "grads(B)": 0, "optimizer(B)": 0}
    lin(torch.randn(3, 10)).sum().backward()
    opt.step()
    got = state_bytes([lin], [opt])
    # exp_avg + exp_avg_sq (55 floats each) + one float32 "step" scalar per parameter tensor.
    assert got == {"params(B)": 220, "grads(B)": 220, "optimizer(B)": 2 * 220 + 2 * F32}


def _block(name: str, t: float, *, wire: int = 0, saved: int = 0, state: int = 0) -> BlockCost:
    return BlockCost(name=name, local_s=t, glob_s=t, wire_bytes=wire, saved_local_bytes=saved,
                     saved_glob_bytes=saved, state_local_bytes=state, state_glob_bytes=state)


def test_scaling_model_on_a_synthetic_cost_table():
    blocks = [_block("b0", 1.0, wire=100, saved=10, state=1000),
              _block("b1", 2.0, wire=200, saved=30, state=1000),
              _block("b2", 3.0, wire=300, saved=20, state=1000),
              _block("b3", 4.0, wire=40, saved=50, state=1000)]
    link = Link(latency_s=0.5, bytes_per_s=100.0)
    a = predict_backprop(blocks, batch_size=8)
    assert a["throughput(samples/s)"] == pytest.approx(8 / 10)
    assert a["memory_per_device(B)"] == 110 + 4000

    # S = 2 over [3, 1]: stage 0 computes 6 s and sends 300 B (0.5 + 3 s); stage 1 computes
    # 4 s and receives the same 3.5 s. Stage times 9.5 and 7.5; 10 batches take
    # 9.5 + 7.5 + 9 * 9.5 = 102.5 s.
    c = predict_pipelocal(blocks, 2, batch_size=8, batches=10, link=link, channel_depth=2)
    assert c["partition"] == [3, 1]
    assert c["stage_time(s)"] == pytest.approx([9.5, 7.5])
    assert c["throughput(samples/s)"] == pytest.approx(80 / 102.5)
    # Stage 0: largest block peak 30, two 300 B messages in flight, 3 blocks of state.
    assert c["memory_per_stage"][0]["total(B)"] == 30 + 600 + 3000
    assert c["memory_per_stage"][1]["total(B)"] == 50 + 600 + 1000

    # 1F1B, S = 2 over [2, 2], M = 4: per micro-batch stage 0 computes 3/4 s and moves 50 B
    # each way (2 x (0.5 + 0.5) = 2 s); stage 1 computes 7/4 s + 2 s. Step = (4 + 1) x 3.75.
    d = predict_torchpipe(blocks, 2, schedule="1f1b", microbatches=4, batch_size=8, link=link,
                          partition=[2, 2])
    assert d["throughput(samples/s)"] == pytest.approx(8 / (5 * 3.75))
    # Stage 0 holds min(4, 2) = 2 of 4 micro-batches of its 40 B, stage 1 one of 4 of 70 B.
    assert [m["activation(B)"] for m in d["memory_per_stage"]] == [20, 17.5]
    g = predict_torchpipe(blocks, 2, schedule="gpipe", microbatches=4, batch_size=8, link=link,
                          partition=[2, 2])
    assert [m["activation(B)"] for m in g["memory_per_stage"]] == [40, 70]


def _tiny_config():
    from pipelocal.config import load_config

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-10k"
    if not data.is_dir():
        pytest.skip(f"mnist-10k not at {data}")
    return load_config(None, [
        "data.name=mnist-10k", f"data.data_dir={str(data)!r}", "data.batch_size=32",
        "model.name=mlp", "model.hidden=32", "model.depth=3", "model.batchnorm=false",
        "rule.name='glob'", "pipeline.timeout_s=60",
    ])


def _backprop_losses(cfg, batches):
    """Single-device backprop of the whole model (fresh blocks, each block's Adam): the loss of
    each batch before the step on it."""
    from benchmarks.headline.peers import build_all
    from benchmarks.headline.torchpipe import BlockChain

    blocks, _ = build_all(cfg)
    model, losses = BlockChain(blocks), []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        for b in blocks:
            b.optimizer.step()
            b.optimizer.zero_grad(set_to_none=True)
    return losses


@pytest.mark.timeout(120)
def test_torch_pipelining_peer_gives_the_single_device_loss():
    """Steps of (d) equal single-device backprop on the same batch, loss for loss.

    Both settings run one step on batch 0, one after the other in the same processes: GPipe
    sees the initial weights, 1F1B the weights after GPipe's Adam step. Without BatchNorm (whose
    statistics are per micro-batch) and dropout, the mean of the 4 micro-batch losses is the
    full batch's cross-entropy, and the scaled micro-batch gradients are the full batch's.
    """
    from benchmarks.headline.peers import build_all
    from benchmarks.headline.torchpipe import run_torchpipe

    cfg = _tiny_config()
    ranks = run_torchpipe(cfg, [2, 2], [("gpipe", 4), ("1f1b", 4)], warmup=0, steps=1,
                          threads=1, transport_rounds=0)
    assert [r["blocks"] for r in ranks] == [["fc1", "fc2"], ["fc3", "out"]]
    _, batches = build_all(cfg)
    # The loss, then one single-device backprop step with each block's Adam.
    expected = _backprop_losses(cfg, [batches[0]] * 2)
    got = [sum(s["last_losses"]) / 4 for s in ranks[-1]["settings"]]
    assert [len(s["last_losses"]) for s in ranks[-1]["settings"]] == [4, 4]
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[1] < expected[0]  # the step did something


def test_cli_hands_every_argument_to_the_script():
    from pipelocal.cli import _parser, cmd_bench

    args = _parser().parse_args(["bench", "--quick", "--models", "mlp", "--set", "a.b=1"])
    assert args.func is cmd_bench
    assert args.args == ["--quick", "--models", "mlp", "--set", "a.b=1"]


@pytest.mark.parametrize("rule", ["glob", "predsim"])
def test_single_device_peer_steps_the_engine(rule):
    """Peers (a) and (b) run the engine's training step and count its saved tensors."""
    from benchmarks.headline.peers import single_device

    cfg = _tiny_config().replace(rule={"name": rule})
    out = single_device(cfg, warmup=1, steps=2)
    assert len(out["step(s)"]) == 2 and all(s > 0 for s in out["step(s)"])
    assert out["throughput(samples/s)"] == pytest.approx(
        2 * cfg.data.batch_size / sum(out["step(s)"]))
    assert out["activation_peak(B)"] > 0


def test_help_lists_every_registered_benchmark():
    import subprocess
    import sys

    from benchmarks.__main__ import describe
    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()
              if line.startswith("  ")}
    assert listed == {name: describe(name) for name in BENCHMARKS}
    assert all(listed.values())  # every module has a one-line docstring


def test_an_unknown_benchmark_names_the_available_ones(capsys):
    from benchmarks.__main__ import main

    assert main(["no_such_bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no_such_bench'" in err and all(n in err for n in BENCHMARKS)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_registered_benchmark_has_a_main(name):
    import importlib

    assert callable(importlib.import_module(BENCHMARKS[name]).main)


def test_micro_memory_falls_with_the_micro_batch_count():
    """A block holds one micro-batch's graph at a time; the wire holds the largest one."""
    from benchmarks.headline.peers import micro_memory

    cfg = _tiny_config().replace(rule={"name": "pred"}, model={"batchnorm": True})
    mem = micro_memory(cfg, [1, 4])
    one, four = mem["1"]["blocks"], mem["4"]["blocks"]
    assert [b["name"] for b in one] == [b["name"] for b in four] == ["fc1", "fc2", "fc3", "out"]
    for a, b in zip(one[1:], four[1:]):  # the first block's input is the batch itself
        assert b["saved_local_bytes"] < a["saved_local_bytes"] / 2
    assert [b["wire_bytes"] * 4 for b in four] == [b["wire_bytes"] for b in one]  # 32 -> 8 rows
    assert [b["state_local_bytes"] for b in four] == [b["state_local_bytes"] for b in one]


def test_micro_analysis_compares_each_count_with_one_and_with_1f1b():
    from benchmarks.headline.analysis import MIB, analyse_micro

    blocks = [{"saved_local_bytes": s * MIB, "state_local_bytes": MIB, "wire_bytes": w * MIB}
              for s, w in ((8, 2), (4, 1))]
    half = [{**b, "saved_local_bytes": b["saved_local_bytes"] / 2,
             "wire_bytes": b["wire_bytes"] / 2} for b in blocks]

    def c(tp):
        return {"throughput(samples/s)": tp, "peak_rss(MiB)": [700, 690],
                "busy_fraction": [0.9, 0.8]}

    def d(tp, m):
        return {"schedule": "1f1b", "microbatches": m, "throughput(samples/s)": tp,
                "activation_peak(B)": 3 * MIB, "params(B)": MIB, "grads(B)": MIB,
                "optimizer(B)": 0, "peak_rss(MiB)": 720, "busy_fraction": 0.5}

    reps = [{"c": {"pred": {"1": c(100.0), "2": c(150.0)}},
             "d": [{"settings": [d(80.0, 4), d(60.0, 8)]}] * 2} for _ in range(2)]
    raw = {"repeats": reps, "rules": ["pred"], "micro_batches": [1, 2], "partition": [1, 1],
           "channel_depth": 2, "memory": {"pred": {"1": {"blocks": blocks},
                                                   "2": {"blocks": half}}}}
    out = analyse_micro(raw)
    assert list(out["peers"]) == ["c pred M=1", "c pred M=2", "d 1f1b"]
    assert out["ratios"]["c pred M=2 / c pred M=1"]["median"] == 1.5
    assert out["ratios"]["d 1f1b / c pred M=1"]["median"] == 0.8
    assert out["peers"]["d 1f1b"]["microbatches"] == 4
    m2 = out["peers"]["c pred M=2"]
    assert m2["activation(MiB)"] == [4, 2] and m2["state(MiB)"] == [1, 1]
    assert m2["in_flight(MiB)"] == [2 * 1, 2 * 1]  # depth 2 x the edge's 1 MiB, both ends


@pytest.mark.timeout(120)
def test_ddp_peer_gives_the_single_device_loss_on_uneven_slices():
    """Two DDP ranks on slices of 17 and 16 rows of a 33-row batch: the row-weighted loss of
    the global batch, and after one step the next one, equal single-device backprop on the
    whole batch to float tolerance (the two slices' gradients are summed, not computed as one
    sum, so the rounding differs: not bitwise). No BatchNorm, no dropout."""
    from benchmarks.headline.ddp import run_ddp
    from benchmarks.headline.peers import build_all

    cfg = _tiny_config().replace(data={"batch_size": 33})
    ranks = run_ddp(cfg, 2, warmup=0, steps=2, threads=1)
    assert [r["rows"] for r in ranks] == [17, 16]
    expected = _backprop_losses(cfg, build_all(cfg)[1][:2])
    assert ranks[0]["losses"] == pytest.approx(expected, rel=1e-5)
    assert ranks[1]["losses"] == ranks[0]["losses"]


def test_replicas_report_gives_each_layout_beside_ddp():
    from benchmarks.headline.replicas import markdown

    def rep(tput):
        return {"throughput(samples/s)": tput, "peak_rss(MiB)": [100.0, 120.0]}

    res = {"repeats": [{"ddp": rep(1000.0), "replicas": rep(800.0), "stages": rep(1500.0)}],
           "median(samples/s)": {"ddp": 1000.0, "replicas": 800.0, "stages": 1500.0},
           "vs_ddp": {"replicas": 0.8, "stages": 1.5},
           "predicted": {k: {"samples/s": v} for k, v in
                         {"ddp": 1100.0, "replicas": 800.0, "stages": 1200.0}.items()},
           "prediction_error": {"ddp": 0.1, "replicas": 0.0, "stages": -0.2}}
    text = markdown({"settings": {"replicas": 2}, "command": "python -m benchmarks replicas",
                     "git": {"commit": "0123456789abc"}, "machine_note": "quiet",
                     "models": {"mlp": {"label": "MLP", "rules": {"pred": res}}}})
    assert "| MLP | pred | (e) DDP backprop, 2 ranks | 1,000 | 1.00 | 1,100 | +10% | 120 |" in text
    assert "| MLP | pred | pipelocal 1 x 2 | 1,500 | 1.50 | 1,200 | -20% | 120 |" in text


def test_breakdown_splits_each_stage_wall_into_parts_that_add_up():
    from benchmarks.headline.analysis import breakdown

    record = {"stage0/wall(s)": 10.0, "stage0/busy(s)": 7.0, "stage0/recv_wait(s)": 0.0,
              "stage0/send_wait(s)": 1.0, "stage0/samples": 40 * 8,
              "stage1/wall(s)": 10.0, "stage1/busy(s)": 9.0, "stage1/recv_wait(s)": 0.5,
              "stage1/send_wait(s)": 0.0, "stage1/samples": 40 * 8, "time/epoch(s)": 10.5,
              "stage0/minor_faults": 400, "stage1/minor_faults": 0}
    # Stage 0's send calls took 1.3 s, 1.0 of it waiting; stage 1's receive calls 0.6 s, 0.5
    # of it waiting; stage 1's other threads ran 0.25 s.
    record |= {"stage0/send_total(s)": 1.3, "stage0/recv_total(s)": 0.0,
               "stage1/recv_total(s)": 0.6, "stage1/send_total(s)": 0.0,
               "stage1/other_threads_cpu(s)": 0.25}
    # 40 batches of 8; at the concurrent ideal stage 0 needs 0.15 s a batch, stage 1 0.2 s.
    parts = breakdown(record, [0.15, 0.2], batch=8)
    assert parts[0] == pytest.approx({"compute_ideal": 6.0, "compute_excess": 1.0,
                                      "recv_wait": 0.0, "recv_handling": 0.0,
                                      "send_wait": 1.0, "send_handling": 0.3, "other": 1.7,
                                      "wall": 10.0, "outside": 0.5, "threads_cpu": math.nan,
                                      "minor_faults/batch": 10.0}, nan_ok=True)
    assert parts[1] == pytest.approx({"compute_ideal": 8.0, "compute_excess": 1.0,
                                      "recv_wait": 0.5, "recv_handling": 0.1,
                                      "send_wait": 0.0, "send_handling": 0.0, "other": 0.4,
                                      "wall": 10.0, "outside": 0.5, "threads_cpu": 0.25,
                                      "minor_faults/batch": 0.0})
    for p in parts:
        inside = sum(v for k, v in p.items() if k not in ("wall", "outside", "threads_cpu",
                                                           "minor_faults/batch"))
        assert inside == pytest.approx(p["wall"])


def test_contention_slows_the_modelled_compute_not_the_link():
    blocks = [_block("b0", 1.0, wire=100), _block("b1", 1.0, wire=100)]
    link = Link(latency_s=0.5, bytes_per_s=100.0)  # 1.5 s per message
    kw = {"batch_size": 8, "batches": 10, "link": link, "channel_depth": 2}
    alone = predict_pipelocal(blocks, 2, **kw)
    shared = predict_pipelocal(blocks, 2, contention=1.5, **kw)
    assert alone["stage_time(s)"] == pytest.approx([2.5, 2.5])
    assert shared["stage_time(s)"] == pytest.approx([3.0, 3.0])
    d = predict_torchpipe(blocks, 2, schedule="1f1b", microbatches=2, batch_size=8, link=link,
                          partition=[1, 1], contention=2.0)
    # per micro-batch: 2 x 1.0 / 2 compute + 2 x (0.5 + 50 / 100) both ways; (2 + 1) of them
    assert d["throughput(samples/s)"] == pytest.approx(8 / (3 * (1.0 + 2.0)))


def test_calibrated_backprop_shares_add_up_to_the_measured_step():
    from benchmarks.headline.analysis import calibrated

    blocks = [_block("b0", 1.0), _block("b1", 3.0)]
    cal = calibrated(blocks, 6.0)
    assert [b.glob_s for b in cal] == pytest.approx([1.5, 4.5])
    assert [b.local_s for b in cal] == [1.0, 3.0]  # the local steps are measured as they run
    assert predict_backprop(cal, 6)["throughput(samples/s)"] == pytest.approx(1.0)


@pytest.mark.timeout(300)
def test_concurrent_ideal_times_every_stage_at_once(tmp_path):
    """Two real processes, one per stage of a tiny MLP, meet at the barrier and each times its
    own blocks for the window."""
    from benchmarks.headline.bench import Runner, parse_args, preset_for

    cfg = _tiny_config()  # skips without mnist-10k
    args = parse_args(["--quick", "--models", "mlp", "--data-dir", cfg.data.data_dir,
                       "--batch-size", "32"])
    preset = preset_for("mlp", quick=True)
    stages = Runner(args, preset, tmp_path).concurrent("pred", [2, 2])
    assert [st["stage"] for st in stages] == [0, 1]
    for st in stages:
        assert st["steps"] >= 3 and st["step_mean(s)"] > 0 and st["step_median(s)"] > 0


def test_concurrent_ideal_averages_the_runs_before_and_after():
    from benchmarks.headline.analysis import concurrent_steps

    runs = {"before": [{"step_mean(s)": 0.10}, {"step_mean(s)": 0.30}],
            "after": [{"step_mean(s)": 0.20}, {"step_mean(s)": 0.50}]}
    assert concurrent_steps(runs) == pytest.approx([0.15, 0.40])


def test_the_ideal_in_the_stages_averages_the_epochs_around_the_measured_one():
    from benchmarks.headline.bench import ideal_steps

    records = [{"stage0/ideal_step(s)": 0.1, "stage1/ideal_step(s)": 0.3},
               {"stage0/ideal_step(s)": 0.2, "stage1/ideal_step(s)": 0.5}]
    assert ideal_steps(records, 2) == pytest.approx([0.15, 0.4])
    assert ideal_steps([records[0], {"stage0/ideal_step(s)": 0.2}], 2) is None  # not measured


def test_pipelocals_figures_are_its_median_measured_epochs():
    """Epoch 1 is a warm-up; the figures are the measured epoch of median throughput, and each
    measured epoch keeps its throughput and the ideal measured just before and after it."""
    from benchmarks.headline.bench import pipelocal_stats

    def record(throughput: float, ideal: float) -> dict:
        stage = {"busy(s)": 1.0, "wall(s)": 2.0, "recv_wait(s)": 0.0, "send_wait(s)": 0.0,
                 "ideal_step(s)": ideal}
        return {"throughput(samples/s)": throughput, "time/epoch(s)": 2.0,
                "stage0/samples": 64} | {f"stage{k}/{key}": v for k in (0, 1)
                                         for key, v in stage.items()}

    records = [record(1.0, 0.1), record(30.0, 0.3), record(10.0, 0.2), record(20.0, 0.5)]
    stats = pipelocal_stats({"records": records, "command": []}, 2)
    assert stats["throughput(samples/s)"] == 20.0 and stats["record"] is records[3]
    assert [e["throughput(samples/s)"] for e in stats["epochs"]] == [30.0, 10.0, 20.0]
    assert [e["ideal_step(s)"][1] for e in stats["epochs"]] == pytest.approx([0.2, 0.25, 0.35])
    assert stats["ideal_step(s)"] == pytest.approx([0.35, 0.35])


def test_micro_batches_cost_what_their_rows_were_measured_to_cost():
    from benchmarks.headline.analysis import micro_table

    blocks = [_block("b0", 4.0), _block("b1", 4.0)]
    link = Link(latency_s=0.0, bytes_per_s=1.0)  # no wire bytes: no transfer time
    kw = {"schedule": "1f1b", "microbatches": 4, "batch_size": 8, "link": link,
          "partition": [1, 1]}
    # 1/M of the batch: 1 s a micro-batch, (4 + 1) of them
    assert predict_torchpipe(blocks, 2, **kw)["throughput(samples/s)"] == pytest.approx(8 / 5)
    # measured at 2 rows: 1.5 s a micro-batch (small batches run less efficiently)
    raw = {"batch_size": 8, "plan_profile": {"glob_blocks_at": {"2": [{"glob_s": 1.5}] * 2}}}
    micro = micro_table(raw, blocks, 4)
    assert micro is not None and [b.glob_s for b in micro] == [1.5, 1.5]
    assert predict_torchpipe(blocks, 2, micro=micro, **kw)["throughput(samples/s)"] == \
        pytest.approx(8 / 7.5)
    assert micro_table(raw, blocks, 2) is None  # 4 rows were not measured


def test_the_optimiser_steps_once_per_batch_under_torch_pipelining():
    import dataclasses

    from benchmarks.headline.analysis import calibrated

    # 4 s a block, 1 s of it the optimiser step
    blocks = [dataclasses.replace(_block(f"b{i}", 4.0), glob_opt_s=1.0) for i in range(2)]
    link = Link(latency_s=0.0, bytes_per_s=1.0)
    kw = {"schedule": "1f1b", "microbatches": 3, "batch_size": 6, "link": link,
          "partition": [1, 1]}
    # forward + backward: 3 s / 3 = 1 s a micro-batch, (3 + 1) of them; then one 1 s step
    assert predict_torchpipe(blocks, 2, **kw)["throughput(samples/s)"] == pytest.approx(6 / 5)
    # at a micro-batch's rows: 2.5 s measured with its own 1 s step, which runs once
    micro = [dataclasses.replace(b, glob_s=2.5) for b in blocks]
    assert predict_torchpipe(blocks, 2, micro=micro, **kw)["throughput(samples/s)"] == \
        pytest.approx(6 / (4 * 1.5 + 1))
    # one stage, one micro-batch: the backprop step, optimiser included
    assert predict_torchpipe(blocks, 1, schedule="gpipe", microbatches=1, batch_size=6,
                             link=link)["throughput(samples/s)"] == \
        pytest.approx(predict_backprop(blocks, 6)["throughput(samples/s)"])
    cal = calibrated(blocks, 16.0)  # scaled as a whole: the step's parts keep their shares
    assert [(b.glob_s, b.glob_opt_s) for b in cal] == [(8.0, 2.0), (8.0, 2.0)]
    with pytest.raises(ValueError, match="longer than its whole backprop step"):
        dataclasses.replace(blocks[0], glob_opt_s=5.0)


def test_a_blocks_backprop_share_computes_its_inputs_gradient():
    """Backprop passes a gradient to every block but the first: the profile's share of a block
    must compute it (the matrix product of a linear layer's input gradient, a third of its
    forward and backward)."""
    from benchmarks.headline.peers import _glob_block_step

    cfg = _tiny_config()
    from pipelocal.engine import build_blocks
    from pipelocal.models import build_model

    specs = build_model(cfg.model, (1, 28, 28), 10)
    blocks = build_blocks(cfg.replace(rule={"name": "glob"}), specs, 10, range(len(specs)),
                          "cpu")
    seen: list[bool] = []
    for block in blocks[:2]:
        x = torch.randn(4, 1, 28, 28) if block.index == 0 else torch.randn(
            4, *blocks[0].spec.wire_shape)
        hook = block.body.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].requires_grad))
        opt_s = _glob_block_step(block, x, torch.zeros(4, dtype=torch.long))
        hook.remove()
        assert opt_s > 0
    assert seen == [False, True]


@pytest.mark.timeout(120)
def test_reanalysis_recomputes_a_committed_result_from_its_raw_measurements(tmp_path):
    import json
    import shutil

    from benchmarks.common import RESULTS_DIR
    from benchmarks.headline.analysis import analyse_model
    from benchmarks.headline.bench import reanalyse

    path = tmp_path / "bench.json"
    shutil.copy(RESULTS_DIR / "bench.json", path)
    before = json.loads(path.read_text())
    for m in before["models"].values():  # figures that a re-analysis must bring back
        m["scaling"] = m["targets"] = None
    path.write_text(json.dumps(before))
    assert reanalyse(path) == 0
    after = json.loads(path.read_text())
    assert after["git"] == before["git"] and after["started"] == before["started"]
    assert after["reanalysed"]["command"]
    for name, m in after["models"].items():
        assert m["raw"] == before["models"][name]["raw"]
        fresh = json.loads(json.dumps(analyse_model(m["raw"])))
        assert m["scaling"] == fresh["scaling"] and m["targets"] == fresh["targets"]
    assert "Figures recomputed from these measurements" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
