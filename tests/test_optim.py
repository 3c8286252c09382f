"""Tests for pipelocal.optim: the learning-rate schedules (step, cosine with the AugLocal
authors' warm-up, constant)."""

from __future__ import annotations

import itertools

import pytest

from pipelocal.config import ScheduleConfig
from pipelocal.optim import learning_rate, lr_factor


def test_step_schedule_quarters_at_50_75_89_94_percent() -> None:
    cfg = ScheduleConfig(name="step")
    got = [lr_factor(cfg, e, 100) for e in range(100)]
    expected = [0.25 ** sum(e >= m for m in (50, 75, 89, 94)) for e in range(100)]
    assert got == expected
    assert (got[49], got[50], got[74], got[75], got[89], got[94], got[99]) == (
        1.0,
        0.25,
        0.25,
        0.0625,
        0.25**3,
        0.25**4,
        0.25**4,
    )


def test_step_schedule_first_epoch_runs_at_the_base_lr() -> None:
    """Milestones are fractions in (0, 1) of training: none has passed when training starts."""
    cfg = ScheduleConfig(name="step")
    decayed = {e: lr_factor(cfg, 0, e) for e in range(1, 21) if lr_factor(cfg, 0, e) != 1.0}
    assert decayed == {}, f"epochs -> factor of epoch 0: {decayed}"


def test_cosine_schedule_goes_from_one_to_near_zero() -> None:
    cfg = ScheduleConfig(name="cosine")
    got = [lr_factor(cfg, e, 100) for e in range(100)]
    assert got[0] == 1.0 and got[50] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(got))
    assert 0 <= got[-1] < 1e-3
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_cosine_warmup_is_the_auglocal_authors_formula() -> None:
    """ChenxiangMA/AugLocal ``train.py``, ``adjust_learning_rate`` (lines 430-438), called once
    per epoch with e = 1..400 (line 233), lr 0.8, 10 warm-up epochs from 0.01. By hand, with
    cos(pi/200) = 0.99987663, cos(pi/40) = 0.99691733, cos(11 pi/400) = 0.99627038:
    e = 1: 0.01; e = 2: 0.4 * 1.99987663 / 10 + 0.009 = 0.08899507;
    e = 10: 0.4 * 1.99691733 * 9/10 + 0.001 = 0.71989024; e = 11: 0.4 * 1.99627038 = 0.79850815;
    e = 200: 0.4; e = 400: 0."""
    cfg = ScheduleConfig(name="cosine", warmup_epochs=10, warmup_start_lr=0.01)
    want = {1: 0.01, 2: 0.08899507, 10: 0.71989024, 11: 0.79850815, 200: 0.4, 400: 0.0}
    for e, lr in want.items():
        assert learning_rate(cfg, 0.8, e - 1, 400) == pytest.approx(lr, abs=1e-8), e
    got = [learning_rate(cfg, 0.8, e, 400) for e in range(400)]
    assert all(a < b for a, b in itertools.pairwise(got[:10]))  # warming up
    assert all(a > b for a, b in itertools.pairwise(got[10:]))  # then the cosine down to 0
    # without a warm-up: today's cosine, from the full learning rate at epoch 0
    plain = ScheduleConfig(name="cosine")
    assert learning_rate(plain, 0.8, 0, 400) == 0.8 == 0.8 * lr_factor(plain, 0, 400)


def test_constant_schedule() -> None:
    cfg = ScheduleConfig(name="constant")
    assert {lr_factor(cfg, e, 10) for e in range(10)} == {1.0}


def test_step_schedule_with_milestone_epochs_is_the_authors_bisect_right() -> None:
    """The authors: lr * fact ** bisect_right(milestones, epoch - 1) for 1-based epochs."""
    import bisect

    cfg = ScheduleConfig(name="step", milestone_epochs=(200, 300, 350, 375), gamma=0.25)
    for epoch_1based in (1, 200, 201, 300, 301, 351, 376, 400):
        expected = 0.25 ** bisect.bisect_right([200, 300, 350, 375], epoch_1based - 1)
        assert lr_factor(cfg, epoch_1based - 1, 400) == expected
    assert lr_factor(cfg, 199, 400) == 1.0 and lr_factor(cfg, 200, 400) == 0.25
    # The epochs are absolute: a shorter run keeps them (only the fractions scale).
    assert lr_factor(cfg, 250, 1000) == 0.25
