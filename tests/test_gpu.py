"""GPU tests: run with `pytest -m gpu` on a machine with CUDA (skipped here with a reason).

They check what cannot be checked on CPU: the NCCL data path, deterministic CUDA kernels, the
CUDA-event timers and the device memory figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelocal.launch import PipelineError, train
from pipelocal.pipeline.faults import FAULT_ENV
from tests.conftest import assert_identical, checkpoint_tensors, tiny_config

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_single_gpu_runs_repeat_bitwise(tmp_path: Path) -> None:
    """Deterministic kernels (run.deterministic, on by default): two runs, the same bits."""
    a = train(tiny_config(tmp_path / "a", "pipeline.stages=1", "run.device=cuda"))
    b = train(tiny_config(tmp_path / "b", "pipeline.stages=1", "run.device=cuda"))
    assert_identical(checkpoint_tensors(a["run_dir"]), checkpoint_tensors(b["run_dir"]))


def test_one_gpu_plans_one_stage(tmp_path: Path) -> None:
    if torch.cuda.device_count() != 1:
        pytest.skip("needs exactly one visible CUDA device")
    result = train(tiny_config(tmp_path))  # pipeline.stages = 0: automatic
    assert result is not None and _records(result["run_dir"])[0].get("stage1/busy(s)") is None


@two_gpus
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nccl_pipeline_equals_single_gpu(tmp_path: Path, precision: str) -> None:
    single = train(tiny_config(tmp_path / "one", "pipeline.stages=1", "run.device=cuda",
                               f"run.precision={precision}"))
    piped = train(tiny_config(tmp_path / "two", "pipeline.stages=2", "run.device=cuda",
                              f"run.precision={precision}"))
    assert_identical(checkpoint_tensors(piped["run_dir"]), checkpoint_tensors(single["run_dir"]))
    assert piped["test/acc"] == single["test/acc"]


@two_gpus
def test_stage_raising_on_gpu_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "1:3:raise")
    with pytest.raises(PipelineError, match=r"stage 1 .* failed at epoch 0, batch 3"):
        train(tiny_config(tmp_path, "pipeline.stages=2", "run.device=cuda"))


@two_gpus
def test_memory_and_timer_figures_present(tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path, "pipeline.stages=2", "run.device=cuda"))
    record = _records(result["run_dir"])[-1]
    for stage in (0, 1):
        assert record[f"stage{stage}/max_allocated(MiB)"] > 0
        allocated = record[f"stage{stage}/max_allocated(MiB)"]
        assert record[f"stage{stage}/max_reserved(MiB)"] >= allocated
        assert record[f"stage{stage}/nvml_process(MiB)"] is not None
        assert record[f"stage{stage}/deterministic"] is True
        assert 0 < record[f"stage{stage}/busy(s)"] <= record[f"stage{stage}/wall(s)"]


@two_gpus
def test_torchrun_nccl_run_exits_cleanly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipelocal", "train", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=tr",
           "--set", "run.epochs=2", "--set", "run.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(nccl, cuda)" in proc.stdout
    assert "Watchdog" not in proc.stderr and "abort" not in proc.stderr.lower()
