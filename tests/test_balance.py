"""Tests for pipelocal.pipeline.balance: the predicted speed-up accounts for shared CPU cores."""

from __future__ import annotations

import pytest

from pipelocal.pipeline.balance import Balance, BlockProfile


def _balance(concurrent: int) -> Balance:
    profiles = [BlockProfile(f"b{i}", 0.010, 4, 4, 4) for i in range(4)]  # 10 ms per block
    return Balance([1, 1, 1, 1], profiles, batch_size=100, channel_depth=2, concurrent=concurrent)


def test_four_stages_on_two_cores_predict_two_x_and_warn() -> None:
    balance = _balance(concurrent=2)
    assert balance.batch_time == pytest.approx(0.020)  # 40 ms of work over 2 cores
    assert "(2.00x one process" in balance.table()
    assert balance.warnings() == [
        "warning: 4 stages but only 2 can compute at once (CPU cores // threads per stage); "
        "the stages share cores, and the prediction accounts for it: use at most 2 stages here"
    ]


def test_one_device_per_stage_predicts_the_slowest_stage() -> None:
    balance = _balance(concurrent=0)
    assert balance.batch_time == pytest.approx(0.010)
    assert "(4.00x one process" in balance.table() and balance.warnings() == []
