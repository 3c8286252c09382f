"""The headline guarantee: a pipelined run computes exactly what the single-process run does.

Local learning sends nothing backward between blocks, so splitting the blocks over S processes
changes when work happens, never what is computed. Parameters, BN buffers, optimiser state and
random generators after training must be bitwise identical (torch.equal) for S = 1..4.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelocal.run import train
from tests.conftest import assert_identical, checkpoint_tensors, tiny_config

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
# The original rules over 2-4 stages; each newer rule and model over 2 stages (CPU time).
_CASES = [
    *[pytest.param((f"rule.name={r}",), s, id=f"{r}-S{s}")
      for r in ("predsim", "pred-bpf", "sim") for s in (2, 3, 4)],
    *[pytest.param((f"rule.name={r}", *extra), 2, id=f"{r}-S2")
      for r, extra in (("sym", ()), ("scfb", ("rule.classifier_loss=hinge",)), ("tlc", ()))],
    pytest.param(("rule.name=tlc", *_CNN5), 2, id="tlc-mostafa-cnn5-S2"),
    pytest.param(("rule.name=predsim", *_CNN5), 2, id="predsim-mostafa-cnn5-S2"),
]


@pytest.mark.parametrize(("overrides", "stages"), _CASES)
def test_pipeline_equals_single_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, overrides: tuple[str, ...],
    stages: int
) -> None:
    ref = _reference(tmp_path_factory, overrides)
    result = train(tiny_config(tmp_path, *overrides, f"pipeline.stages={stages}"))
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


def test_bf16_wire_trains_close_to_exact(tmp_path: Path) -> None:
    """bf16 on the wire halves traffic; results differ from exact but training still works."""
    exact = train(tiny_config(tmp_path / "a", "pipeline.stages=2"))
    bf16 = train(tiny_config(tmp_path / "b", "pipeline.stages=2", "pipeline.wire_dtype=bfloat16"))
    a = checkpoint_tensors(exact["run_dir"])[3]["module"]["body.weight"]
    b = checkpoint_tensors(bf16["run_dir"])[3]["module"]["body.weight"]
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.05)
