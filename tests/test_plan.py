"""Tests for pipelocal.pipeline.plan: the predicted speed-up accounts for shared CPU cores."""

from __future__ import annotations

import pytest

from pipelocal.pipeline.plan import BlockProfile, Plan


def _plan(concurrent: int) -> Plan:
    profiles = [BlockProfile(f"b{i}", 0.010, 4, 4, 4) for i in range(4)]  # 10 ms per block
    return Plan([1, 1, 1, 1], profiles, batch_size=100, channel_depth=2, concurrent=concurrent)


def test_four_stages_on_two_cores_predict_two_x_and_warn() -> None:
    plan = _plan(concurrent=2)
    assert plan.batch_time == pytest.approx(0.020)  # 40 ms of work over 2 cores
    assert "(2.00x one process" in plan.table()
    assert plan.warnings() == [
        "warning: 4 stages but only 2 can compute at once (CPU cores // threads per stage); "
        "the stages share cores, and the prediction accounts for it: use at most 2 stages here"
    ]


def test_one_device_per_stage_predicts_the_slowest_stage() -> None:
    plan = _plan(concurrent=0)
    assert plan.batch_time == pytest.approx(0.010)
    assert "(4.00x one process" in plan.table() and plan.warnings() == []
