"""The headline guarantee: a pipelined run computes exactly what the single-process run does.

Local learning sends nothing backward between blocks, so splitting the blocks over S processes
changes when work happens, never what is computed. Parameters, BN buffers, optimiser state and
random generators after training must be bitwise identical (torch.equal) for S = 2..4, with
the stages as spawned processes, torchrun ranks or Ray actors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelocal.launch import train
from pipelocal.pipeline.nccl_order import NCCL_ORDER_ENV
from tests.conftest import assert_identical, checkpoint_tensors, needs_ray, tiny_config

pytestmark = pytest.mark.slow

_reference_cache: dict[tuple[str, ...], dict] = {}


def _reference(tmp_path_factory: pytest.TempPathFactory, overrides: tuple[str, ...]) -> dict:
    if overrides not in _reference_cache:
        tmp = tmp_path_factory.mktemp("ref")
        result = train(tiny_config(tmp, *overrides, "pipeline.stages=1"))
        _reference_cache[overrides] = {"state": checkpoint_tensors(result["run_dir"]),
                                       "result": result}
    return _reference_cache[overrides]


_CNN5 = ("model.name=mostafa-cnn5", "model.width=0.0625", "model.input_dropout=0.1")
# Deep models: 2 steps (128 samples in batches of 64), tiny widths.
_DEEP = ("model.width=0.25", "model.dropout=0.0", "run.epochs=1", "data.train_limit=128")


def _case(overrides: tuple[str, ...], stages: int, name: str, split: tuple[int, ...] = (),
          launcher: str = "spawn"):
    """A pipelined run (``split``: its partition) against the same config in one process."""
    marks = [needs_ray] if launcher == "ray" else []
    return pytest.param(overrides, stages, split, launcher, id=name, marks=marks)


# One case per wire path: every rule and model is proven exact in one process by chaining
# engines (tests/test_split_engine.py); what crosses a process boundary differently is here:
# the basic path, middle stages (S = 4, in NCCL's op order), the classifier reading the
# passed-on activation (Mostafa et al.'s nets), bf16 on the wire (also through a middle
# stage), InfoPro's input image travelling with the activation, AugLocal's end-to-end top
# as a stage of its own, and micro-batches, one message each.
_CASES = [
    _case(("rule.name=predsim",), 2, "predsim-S2"),
    _case(("rule.name=predsim",), 4, "predsim-S4"),
    _case(("rule.name=tlc", *_CNN5), 2, "tlc-mostafa-cnn5-S2"),
    # bf16 autocast: the wire carries bf16 (pipeline.wire_dtype = auto), exactly what the next
    # block would have received in one process.
    _case(("rule.name=predsim", "run.precision=bf16"), 2, "predsim-bf16-S2"),
    _case(("rule.name=pred-bpf", "run.precision=bf16"), 3, "pred-bpf-bf16-S3"),
    _case(("rule.name=infopro", "model.name=resnet34", *_DEEP, "model.width=0.0625"), 2,
          "infopro-resnet34-S2", (8, 9)),
    # AugLocal's top aux_depth + 1 blocks learn end to end (rule.top_layers = backprop): here
    # stage 1 is exactly that top (s3b1..out).
    _case(("rule.name=auglocal", "model.name=resnet32", "rule.aux_depth=4", *_DEEP), 2,
          "auglocal-resnet32-S2", (11, 5)),
    # Micro-batches: each one streamed to the next stage as soon as stage 0 is done with it
    # (the short last batch of 44 rows too), against one process with the same count.
    _case(("rule.name=pred", "pipeline.micro_batches=2"), 2, "pred-micro2-S2"),
    # The same worker body as Ray actors (one local Ray instance for the session).
    _case(("rule.name=predsim",), 3, "predsim-S3-ray", launcher="ray"),
]


@pytest.mark.parametrize(("overrides", "stages", "split", "launcher"), _CASES)
def test_pipeline_equals_single_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], stages: int,
    split: tuple[int, ...], launcher: str,
) -> None:
    if launcher == "ray":
        request.getfixturevalue("ray_cluster")
    ref = _reference(tmp_path_factory, overrides)
    if stages >= 3 and launcher == "spawn":
        # Middle stages: their point-to-point ops complete in posting order per communicator,
        # as on NCCL, so a channel layout that would hang on GPUs hangs here.
        monkeypatch.setenv(NCCL_ORDER_ENV, "1")
    partition = [f"pipeline.partition=[{','.join(map(str, split))}]"] if split else []
    result = train(tiny_config(tmp_path, *overrides, f"pipeline.stages={stages}", *partition,
                               f"pipeline.launcher={launcher}"))
    # Tiny configs: 2 epochs of 5 batches (the last one 44 rows), dropout and batch norm in
    # every hidden block; deep ones: 2 batches.
    assert result["step"] == ref["result"]["step"] == (2 if split else 10)
    assert_identical(checkpoint_tensors(result["run_dir"]), ref["state"])
    assert result["test/acc"] == ref["result"]["test/acc"]
    assert result["test/acc_local"] == ref["result"]["test/acc_local"]


def test_measuring_the_ideal_changes_no_result(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """pipeline.ideal_steps: after every epoch both stages train 3 more steps on their last
    batch (2 micro-batches, copied out of the receive buffers), then are restored: the run
    ends exactly as the single process without it, and records each stage's step time."""
    overrides = ("rule.name=pred", "pipeline.micro_batches=2")
    ref = _reference(tmp_path_factory, overrides)
    result = train(tiny_config(tmp_path, *overrides, "pipeline.stages=2",
                               "pipeline.ideal_steps=3"))
    assert_identical(checkpoint_tensors(result["run_dir"]), ref["state"])
    assert result["test/acc_local"] == ref["result"]["test/acc_local"]
    records = [json.loads(line) for line in
               (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["stage0/ideal_step(s)"] > 0 and r["stage1/ideal_step(s)"] > 0
        # where the epoch went: the channel calls hold their waits; gloo's threads ran
        assert r["stage0/send_total(s)"] >= r["stage0/send_wait(s)"]
        assert r["stage1/recv_total(s)"] >= r["stage1/recv_wait(s)"]
        assert r["stage1/other_threads_cpu(s)"] > 0


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    """Train 7 steps (stopping inside epoch 2), resume, finish == train straight through."""
    straight = train(tiny_config(tmp_path / "a", "pipeline.stages=1"))
    first = train(tiny_config(tmp_path / "b", "pipeline.stages=1", "run.max_steps=7"))
    assert first["stopped"] == "max_steps" and first["step"] == 7
    resumed = train(tiny_config(tmp_path / "b", "pipeline.stages=1"), resume=first["run_dir"])
    assert resumed["step"] == straight["step"] == 10
    assert_identical(checkpoint_tensors(resumed["run_dir"]), checkpoint_tensors(
        straight["run_dir"]))


def test_torchrun_equals_spawned_pipeline_and_exits_cleanly(tmp_path: Path) -> None:
    """Bitwise the spawned result; every rank leaves through destroy_process_group (which the
    worker reaches only with nothing posted or in flight) and exits 0 within seconds."""
    spawned = train(tiny_config(tmp_path / "spawn", "pipeline.stages=2"))
    overrides = [
        "model.name=cnn", "model.width=0.25", "model.fc_width=32", "model.dropout=0.1",
        "data.train_limit=300", "data.batch_size=64", "data.eval_batch_size=100",
        "rule.name=predsim", "run.epochs=2", f"run.out_dir={tmp_path / 'torchrun'}",
        "run.progress=false", "run.name=tr", "pipeline.threads_per_stage=1",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipelocal", "train"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    err_file = (tmp_path / "stderr.txt").open("w")  # a file: a full stderr pipe would block
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    last_epoch_at = None
    for line in proc.stdout:  # the coordinator prints the final epoch line, then every rank ends
        if line.startswith("epoch 2/2"):
            last_epoch_at = time.monotonic()
    proc.wait(timeout=240)
    err_file.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert last_epoch_at is not None
    assert time.monotonic() - last_epoch_at < 20, "the ranks did not exit promptly"
    assert "Traceback" not in stderr and "transfers left" not in stderr, stderr[-3000:]
    assert_identical(checkpoint_tensors(tmp_path / "torchrun" / "tr"),
                     checkpoint_tensors(spawned["run_dir"]))


def test_bf16_wire_rounds_only_what_crosses_it(tmp_path: Path) -> None:
    """fp32 compute with a bf16 wire: stage 0's blocks see the same inputs as the exact run and
    end bitwise equal; the blocks behind the wire train on rounded inputs and differ."""
    split = "pipeline.partition=[2,2]"
    exact = train(tiny_config(tmp_path / "a", "pipeline.stages=2", split))
    bf16 = train(tiny_config(tmp_path / "b", "pipeline.stages=2", split,
                             "pipeline.wire_dtype=bfloat16"))
    a, b = checkpoint_tensors(exact["run_dir"]), checkpoint_tensors(bf16["run_dir"])
    assert_identical(a[0], b[0])
    assert_identical(a[1], b[1])
    for block in (2, 3):
        ma, mb = a[block]["module"], b[block]["module"]
        assert any(not torch.equal(ma[k], mb[k]) for k in ma), f"block {block} saw no rounding"
    assert abs(exact["test/acc"] - bf16["test/acc"]) < 0.1


def test_torchrun_restart_resumes_automatically(tmp_path: Path) -> None:
    """A rank killed mid-epoch under `torchrun --max-restarts 1` with run.resume = auto: the
    restarted job continues from the last complete checkpoint and ends bitwise as a straight run."""
    straight = train(tiny_config(tmp_path / "straight", "pipeline.stages=2"))
    overrides = [
        "model.name=cnn", "model.width=0.25", "model.fc_width=32", "model.dropout=0.1",
        "data.train_limit=300", "data.batch_size=64", "data.eval_batch_size=100",
        "rule.name=predsim", "run.epochs=2", f"run.out_dir={tmp_path / 'tr'}",
        "run.progress=false", "run.name=job", "run.resume=auto", "pipeline.threads_per_stage=1",
        "pipeline.timeout_s=30",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "pipelocal", "train"]
    for o in overrides:
        cmd += ["--set", o]
    # Stage 1 dies at step 7, inside epoch 2, after the checkpoint of step 5 (first attempt only).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELOCAL_INJECT_FAULT": "1:7:kill"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pipelocal: pipelined over 2 stages") == 2  # two attempts
    assert_identical(checkpoint_tensors(tmp_path / "tr" / "job"),
                     checkpoint_tensors(straight["run_dir"]))
