"""Tests for pipelocal.pipeline.partition: checking, stage ranges and the balanced split."""

from __future__ import annotations

import itertools

import pytest

from pipelocal.config import ConfigError
from pipelocal.pipeline.partition import balanced_partition, check_partition, stage_ranges

NAMES = ["conv1", "conv2", "fc1", "out"]


@pytest.mark.parametrize("partition", [[4], [1, 3], [2, 2], [1, 1, 1, 1]])
def test_check_partition_accepts_exact_covers(partition: list[int]) -> None:
    check_partition(partition, NAMES)  # raises on failure
    covered = [i for r in stage_ranges(partition) for i in r]
    assert covered == list(range(len(NAMES)))  # every block in exactly one stage, in order


def test_check_partition_too_many_stages() -> None:
    with pytest.raises(ConfigError) as err:
        check_partition([1, 1, 1, 1, 1], NAMES)
    msg = str(err.value)
    assert "pipeline.stages = 5" in msg and "only 4 blocks" in msg
    assert "conv1, conv2, fc1, out" in msg and "use at most 4 stages" in msg


@pytest.mark.parametrize(
    ("partition", "assigned"), [([2, 1], 3), ([3, 3], 6), ([4, 0], 4), ([5, -1], 4)]
)
def test_check_partition_wrong_counts(partition: list[int], assigned: int) -> None:
    with pytest.raises(ConfigError) as err:
        check_partition(partition, NAMES)
    msg = str(err.value)
    assert f"pipeline.partition = {partition}" in msg
    assert f"assigns {assigned} blocks" in msg and "the model has 4" in msg
    assert f"give {len(partition)} counts >= 1 that sum to 4" in msg and "[]" in msg


def test_stage_ranges() -> None:
    assert stage_ranges([3, 2]) == [range(0, 3), range(3, 5)]
    assert stage_ranges([1, 1, 1]) == [range(0, 1), range(1, 2), range(2, 3)]
    assert stage_ranges([]) == []


@pytest.mark.parametrize(
    ("times", "stages", "expected"),
    [
        ([1, 1, 1, 1], 2, [2, 2]),
        ([4, 1, 1, 1, 1], 2, [1, 4]),
        ([1, 1, 1, 1, 4], 2, [4, 1]),
        ([1, 2, 3, 4, 5], 3, [3, 1, 1]),  # 6 | 4 | 5: slowest stage 6
        ([5, 5, 5], 3, [1, 1, 1]),
        ([2, 3, 7], 1, [3]),
    ],
)
def test_balanced_partition_hand_examples(
    times: list[float], stages: int, expected: list[int]
) -> None:
    assert balanced_partition(times, stages) == expected


def _slowest(times: list[float], sizes: list[int]) -> float:
    return max(sum(times[r.start : r.stop]) for r in stage_ranges(sizes))


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balanced_partition_is_optimal(stages: int) -> None:
    times = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    sizes = balanced_partition(times, stages)
    assert len(sizes) == stages and sum(sizes) == len(times) and min(sizes) >= 1
    every = [
        list(c)
        for c in itertools.product(range(1, len(times) + 1), repeat=stages)
        if sum(c) == len(times)
    ]
    assert _slowest(times, sizes) == min(_slowest(times, c) for c in every)


def test_balanced_partition_respects_the_memory_cap() -> None:
    times, memory = [1, 1, 1, 1], [3, 1, 1, 1]
    assert balanced_partition(times, 2) == [2, 2]
    # [2, 2] would put 4 units of memory on stage 0; the cap forces the slower [1, 3].
    assert balanced_partition(times, 2, memory=memory, memory_cap=3) == [1, 3]
    assert balanced_partition(times, 2, memory=memory, memory_cap=0) == [2, 2]  # 0 = no cap


def test_balanced_partition_raises_when_no_split_fits() -> None:
    with pytest.raises(ConfigError) as err:
        balanced_partition([1, 1, 1], 2, memory=[4, 1, 1], memory_cap=3)
    assert "2 stages" in str(err.value) and "pipeline.memory_cap_gib" in str(err.value)
    assert "raise the cap or use more stages" in str(err.value)


@pytest.mark.parametrize("stages", [0, 4])
def test_balanced_partition_rejects_impossible_stage_counts(stages: int) -> None:
    with pytest.raises(ConfigError) as err:
        balanced_partition([1, 1, 1], stages)
    assert f"3 blocks into {stages} stages" in str(err.value) and "1..3" in str(err.value)


def test_balanced_partition_never_starts_a_stage_inside_blocks_kept_together() -> None:
    times = [1.0] * 10
    for stages in range(1, 8):
        split = balanced_partition(times, stages, together=range(6, 10))
        starts = [r.start for r in stage_ranges(split)]
        assert not any(6 < s < 10 for s in starts), (stages, split)
        assert len(split) == stages and sum(split) == 10
    assert balanced_partition(times, 2, together=range(6, 10)) == [5, 5]
    assert balanced_partition(times, 7, together=range(6, 10)) == [1, 1, 1, 1, 1, 1, 4]
    with pytest.raises(ConfigError, match=r"blocks 6\.\.9 share one stage.*use 1\.\.7 stages"):
        balanced_partition(times, 8, together=range(6, 10))


def test_check_partition_names_the_split_group_and_a_fix() -> None:
    names = [f"b{i}" for i in range(6)]
    check_partition([4, 2], names, together=range(4, 6))  # the group whole: fine
    with pytest.raises(ConfigError) as err:
        check_partition([5, 1], names, together=range(4, 6), why="learn together")
    msg = str(err.value)
    assert "pipeline.partition = [5, 1] starts a stage at block b5" in msg
    assert "inside blocks b4..b5, which learn together" in msg
    assert "e.g. pipeline.partition = [3, 3]" in msg
    with pytest.raises(ConfigError, match="use at most 5 stages"):
        check_partition([1, 1, 1, 1, 1, 1], names, together=range(4, 6))
