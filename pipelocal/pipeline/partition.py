"""Partitions: which contiguous blocks each stage owns, checked, or balanced from a profile."""

from __future__ import annotations

from collections.abc import Sequence

from pipelocal.config import ConfigError

__all__ = ["balanced_partition", "check_partition", "stage_ranges"]


def check_partition(partition: Sequence[int], names: Sequence[str]) -> None:
    """Fail unless ``partition`` assigns every one of the model's blocks to exactly one stage."""
    n = len(names)
    if len(partition) > n:
        raise ConfigError(
            f"pipeline.stages = {len(partition)} but the model has only {n} blocks "
            f"({', '.join(names)}); use at most {n} stages"
        )
    if sum(partition) != n or any(k < 1 for k in partition):
        raise ConfigError(
            f"pipeline.partition = {list(partition)} assigns {sum(partition)} blocks but the "
            f"model has {n} ({', '.join(names)}); give {len(partition)} counts >= 1 that sum "
            f"to {n}, or [] for an automatic partition"
        )


def stage_ranges(partition: Sequence[int]) -> list[range]:
    """[3, 2] -> [range(0, 3), range(3, 5)]."""
    out, start = [], 0
    for k in partition:
        out.append(range(start, start + k))
        start += k
    return out


def balanced_partition(
    times: Sequence[float],
    stages: int,
    *,
    memory: Sequence[float] | None = None,
    memory_cap: float = 0.0,
) -> list[int]:
    """The contiguous split of blocks into ``stages`` groups minimising the slowest group's time.

    ``memory[i]`` is block i's memory need; with ``memory_cap`` > 0 no group may exceed it.
    Exact dynamic programme over split points, O(stages * n^2).
    """
    n = len(times)
    if not 1 <= stages <= n:
        raise ConfigError(f"cannot split {n} blocks into {stages} stages; use 1..{n} stages")
    mem = list(memory) if memory is not None else [0.0] * n
    prefix_t, prefix_m = [0.0], [0.0]
    for t, m in zip(times, mem):
        prefix_t.append(prefix_t[-1] + t)
        prefix_m.append(prefix_m[-1] + m)
    inf = float("inf")

    def cost(i: int, j: int) -> float:  # blocks i..j-1 as one stage
        if memory_cap > 0 and prefix_m[j] - prefix_m[i] > memory_cap:
            return inf
        return prefix_t[j] - prefix_t[i]

    # best[s][j]: slowest stage time when the first j blocks form s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    if best[stages][n] == inf:
        raise ConfigError(
            f"no split of the model into {stages} stages fits pipeline.memory_cap_gib; raise the "
            "cap or use more stages"
        )
    sizes, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]
