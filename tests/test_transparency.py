"""The headline guarantee: a pipelined run computes exactly what the single-process run does.

Local learning sends nothing backward between blocks, so splitting the blocks over S processes
changes when work happens, never what is computed. Parameters, BN buffers, optimiser state and
random generators after training must be bitwise identical (torch.equal) for S = 1..4, with
the stages as spawned processes, torchrun ranks or Ray actors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelocal.launch import train
from tests.conftest import assert_identical, checkpoint_tensors, needs_ray, tiny_config

pytestmark = pytest.mark.slow

_reference_cache: dict[tuple[str, ...], dict] = {}

_CASES = [(rule, stages, (), "spawn") for rule in ("predsim", "pred-bpf", "sim")
          for stages in (2, 3, 4)]
_CASES += [
    # bf16 autocast: the wire carries bf16 (pipeline.wire_dtype = auto), exactly what the next
    # block would have received in one process.
    ("predsim", 2, ("run.precision=bf16",), "spawn"),
    ("pred-bpf", 3, ("run.precision=bf16",), "spawn"),
]
# The same worker body as Ray actors (one local Ray instance for the session).
_CASES += [pytest.param("predsim", 3, (), "ray", marks=needs_ray, id="predsim-3-ray"),
           pytest.param("pred-bpf", 2, (), "ray", marks=needs_ray, id="pred-bpf-2-ray")]


def _reference(tmp_path_factory: pytest.TempPathFactory, rule: str, extra: tuple[str, ...]) -> dict:
    key = (rule, *extra)
    if key not in _reference_cache:
        tmp = tmp_path_factory.mktemp(f"ref-{rule}")
        result = train(tiny_config(tmp, f"rule.name={rule}", "pipeline.stages=1", *extra))
        _reference_cache[key] = {"state": checkpoint_tensors(result["run_dir"]),
                                 "result": result}
    return _reference_cache[key]


@pytest.mark.parametrize(("rule", "stages", "extra", "launcher"), _CASES)
def test_pipeline_equals_single_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
    rule: str, stages: int, extra: tuple[str, ...], launcher: str,
) -> None:
    if launcher == "ray":
        request.getfixturevalue("ray_cluster")
    ref = _reference(tmp_path_factory, rule, extra)
    result = train(tiny_config(tmp_path, f"rule.name={rule}", f"pipeline.stages={stages}",
                               f"pipeline.launcher={launcher}", *extra))
    # 2 epochs of 5 batches (the last one 44 rows), dropout and batch norm in every hidden block.
    assert result["step"] == ref["result"]["step"] == 10
    assert_identical(checkpoint_tensors(result["run_dir"]), ref["state"])
    assert result["test/acc"] == ref["result"]["test/acc"]
    assert result["test/acc_local"] == ref["result"]["test/acc_local"]


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    """Train 7 steps (stopping inside epoch 2), resume, finish == train straight through."""
    straight = train(tiny_config(tmp_path / "a", "pipeline.stages=1"))
    first = train(tiny_config(tmp_path / "b", "pipeline.stages=1", "run.max_steps=7"))
    assert first["stopped"] == "max_steps" and first["step"] == 7
    resumed = train(tiny_config(tmp_path / "b", "pipeline.stages=1"), resume=first["run_dir"])
    assert resumed["step"] == straight["step"] == 10
    assert_identical(checkpoint_tensors(resumed["run_dir"]), checkpoint_tensors(
        straight["run_dir"]))


def test_repartition_checkpoint_from_2_stages(tmp_path: Path) -> None:
    """A checkpoint written by 2 stages resumes in 3 stages and in the single-process engine."""
    straight = train(tiny_config(tmp_path / "ref", "pipeline.stages=1"))
    first = train(tiny_config(tmp_path / "s2", "pipeline.stages=2", "run.max_steps=7"))
    assert first["step"] == 7
    ckpt = first["checkpoint"]
    in3 = train(tiny_config(tmp_path / "s2", "pipeline.stages=3"), resume=ckpt)
    state3 = checkpoint_tensors(in3["run_dir"])
    in1 = train(tiny_config(tmp_path / "s2", "pipeline.stages=1"), resume=ckpt)
    assert in1["step"] == in3["step"] == 10
    assert_identical(state3, checkpoint_tensors(straight["run_dir"]))
    assert_identical(checkpoint_tensors(in1["run_dir"]), checkpoint_tensors(straight["run_dir"]))


def test_torchrun_equals_spawned_pipeline(tmp_path: Path) -> None:
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipelined over 2 stages" in proc.stdout
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
        assert not torch.equal(a[block]["module"]["body.weight"], b[block]["module"]["body.weight"])
    assert abs(exact["test/acc"] - bf16["test/acc"]) < 0.1
