"""Tests for pipelocal.metrics: strict JSON with time stamps, records of redone epochs dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipelocal.metrics import Metrics, strict_json


def test_records_are_strict_json_with_a_time_stamp(tmp_path: Path) -> None:
    m = Metrics(tmp_path, progress=False)
    m.log({"epoch": 1, "train/loss": math.nan, "train/loss_local": {"a": math.inf, "b": 1.5}})
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record["train/loss"] is None and record["train/loss_local"] == {"a": None, "b": 1.5}
    assert record["time"] > 1.7e9  # Unix seconds
    assert strict_json([1.0, -math.inf]) == [1.0, None]


def test_a_resumed_run_forgets_the_epochs_it_redoes(tmp_path: Path) -> None:
    m = Metrics(tmp_path, progress=False)
    for epoch in (1, 2, 3):
        m.log({"epoch": epoch})
    m.drop_after(2)  # killed after epoch 3's record, before its checkpoint: resumes at 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
