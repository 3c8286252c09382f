"""Tests for pipelocal.plot: a PNG of the curves from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelocal.cli import main
from pipelocal.metrics import Metrics


def test_plot_writes_a_png_of_a_pipelined_run(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    m = Metrics(tmp_path, progress=False)
    for epoch in (1, 2):
        m.log({"epoch": epoch, "train/loss": 1.0 / epoch, "train/loss_local": {"conv1": 0.5},
               "test/acc": 0.3 * epoch, "test/acc_local": {"conv1": 0.2 * epoch},
               "stage0/busy(s)": 0.8, "stage0/wall(s)": 1.0,
               "stage1/busy(s)": 0.5, "stage1/wall(s)": 1.0})
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_run_without_metrics_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err
