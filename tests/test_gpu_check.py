"""benchmarks/gpu_check.sh --dry-run: every step of the one-GPU check runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_step(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["ok"]
    steps = result["steps"]
    assert sorted(steps) == ["host_sync", "repeat", "rules", "throughput", "timers"]
    assert steps["repeat"]["fp32_repeats_bitwise"] and steps["repeat"]["resume_equals_straight"]
    assert steps["rules"]["raised"] == {}
    assert len(steps["throughput"]["rows"]) == 6  # glob, pred, predsim x fp32, bf16
    assert "hardware" in result and "git" in result  # provenance


def test_gpu_check_refuses_without_a_gpu_unless_dry() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = subprocess.run(["python3", "-m", "benchmarks", "gpu_check"], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
