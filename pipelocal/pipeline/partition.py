"""Partitions: which contiguous blocks each stage owns, checked, or balanced from a profile."""

from __future__ import annotations

from collections.abc import Sequence

from pipelocal.config import ConfigError

__all__ = ["balanced_partition", "check_partition", "max_stages", "stage_ranges"]


def check_partition(
    partition: Sequence[int], names: Sequence[str], *, together: range = range(0), why: str = ""
) -> None:
    """Fail unless ``partition`` assigns every one of the model's blocks to exactly one stage,
    and blocks ``together`` (``why``: the reason, for the message) to one stage."""
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
    cuts = [r.start for r in stage_ranges(partition)[1:] if _inside(r.start, together)]
    if cuts:
        first, last = names[together.start], names[together.stop - 1]
        raise ConfigError(
            f"pipeline.partition = {list(partition)} starts a stage at block {names[cuts[0]]}, "
            f"inside blocks {first}..{last}, which {why or 'learn end to end'} and so must "
            f"share one stage; {_fix(n, len(partition), together)}"
        )


def _inside(cut: int, together: range) -> bool:
    """A stage starting at block ``cut`` would split ``together``."""
    return together.start < cut < together.stop


def max_stages(num_blocks: int, together: range = range(0)) -> int:
    """The most stages ``num_blocks`` blocks can form when blocks ``together`` share one."""
    return num_blocks - max(len(together) - 1, 0)


def _fix(n: int, stages: int, together: range) -> str:
    if stages > max_stages(n, together):
        return f"use at most {max_stages(n, together)} stages"
    even = balanced_partition([1.0] * n, stages, together=together)
    return f"e.g. pipeline.partition = {even}, or [] for an automatic partition"


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
    together: range = range(0),
) -> list[int]:
    """The contiguous split of blocks into ``stages`` groups minimising the slowest group's time.

    ``memory[i]`` is block i's memory need; with ``memory_cap`` > 0 no group may exceed it.
    Blocks ``together`` land in one group (no stage starts inside them). Exact dynamic
    programme over split points, O(stages * n^2).
    """
    n = len(times)
    most = max_stages(n, together)
    if not 1 <= stages <= most:
        kept = (f" (blocks {together.start}..{together.stop - 1} share one stage)"
                if most < n else "")
        raise ConfigError(f"cannot split {n} blocks into {stages} stages{kept}; use "
                          f"1..{most} stages")
    mem = list(memory) if memory is not None else [0.0] * n
    prefix_t, prefix_m = [0.0], [0.0]
    for t, m in zip(times, mem):
        prefix_t.append(prefix_t[-1] + t)
        prefix_m.append(prefix_m[-1] + m)
    inf = float("inf")

    def cost(i: int, j: int) -> float:  # blocks i..j-1 as one stage
        if _inside(i, together) or _inside(j, together):
            return inf
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
