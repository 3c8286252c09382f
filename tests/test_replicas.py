"""Data-parallel replicas (pipeline.replicas = R, R x S ranks): for a fixed R a run is bitwise
the same for every S and launcher, a resume is exact, the gradient average is the whole
batch's, diverged, killed and frozen replicas are named, SIGTERM checkpoints and stops all.

The multi-process runs are few and shared: one R = 2, S = 2 run (300 + 1 digits, so the last
batch of 45 rows splits unevenly, 23 + 22) is the oracle that the other layouts, launchers and
resumes are compared with.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelocal.checkpoint import checkpoint_dir
from pipelocal.config import ConfigError
from pipelocal.launch import PipelineError, evaluate_checkpoint, train
from pipelocal.launch.preflight import Placement, preflight
from pipelocal.launch.torchrun import torchrun_stages
from pipelocal.pipeline.faults import FAULT_ENV, check_fault_spec
from pipelocal.pipeline.pipe import merge_replica_stats
from pipelocal.pipeline.replicas import layout, replica_rows, replica_seed, replica_slices
from tests.conftest import REPO, assert_identical, checkpoint_tensors, needs_ray, tiny_config

_UNEVEN = ("data.train_limit=301",)
"""5 batches per epoch: 4 x 64 rows and 45, which 2 replicas split 23 + 22."""


# --------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize(("total", "replicas", "rows"), [
    (64, 2, [32, 32]), (45, 2, [23, 22]), (10, 4, [3, 3, 2, 2]), (7, 1, [7]), (3, 3, [1, 1, 1]),
])
def test_replica_rows_split_as_evenly_as_rows_allow(total: int, replicas: int,
                                                    rows: list[int]) -> None:
    assert replica_rows(total, replicas) == rows
    slices = replica_slices(total, replicas)
    assert [s.stop - s.start for s in slices] == rows
    assert slices[0].start == 0 and slices[-1].stop == total  # consecutive, in replica order
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))


def test_layout_keeps_a_pipeline_on_consecutive_ranks() -> None:
    assert [layout(rank, 3) for rank in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
                                                      (1, 2)]


def test_replica_seeds_differ_by_replica_and_step() -> None:
    seeds = {replica_seed(7, r, t) for r in (1, 2) for t in (0, 1)}
    assert len(seeds) == 4


def test_epoch_statistics_merge_over_replicas() -> None:
    def block(loss: float, acc: float, rows: int) -> dict[str, Any]:
        return {"loss": loss, "acc": acc, "nonfinite_at": None, "rows": rows, "scored": rows}

    gathered = [{"stage": s, "busy(s)": 1.0 + r, "blocks": {s: block(1.0 + r, 0.5 * r, 30 - r)}}
                for r in range(2) for s in range(2)]  # rank order: replica 0's stages first
    merged = merge_replica_stats(gathered, 2)
    assert [m["stage"] for m in merged] == [0, 1]
    assert merged[0]["busy(s)"] == 1.0  # timings: replica 0's
    b = merged[1]["blocks"][1]
    assert b["rows"] == 59 and b["loss"] == pytest.approx((30 * 1.0 + 29 * 2.0) / 59)
    assert b["acc"] == pytest.approx(round(0.5 * 29) / 59)


def test_torchrun_world_must_be_a_multiple_of_the_replicas() -> None:
    assert torchrun_stages(0, 2, 4) == 2
    assert torchrun_stages(2, 2, 4) == 2
    with pytest.raises(ConfigError, match=r"torchrun started 3 processes, not a multiple of 2"):
        torchrun_stages(0, 2, 3)
    with pytest.raises(ConfigError, match=r"set pipeline\.stages = 2 or start 6 processes"):
        torchrun_stages(3, 2, 4)


def test_fault_spec_names_a_rank_of_the_replicas() -> None:
    check_fault_spec("3:1:kill", 2, 2)
    with pytest.raises(ConfigError, match=r"targets rank 4 but this run has 4 ranks \(2 "):
        check_fault_spec("4:1:kill", 2, 2)


def test_more_ranks_than_gpus_or_rows_are_refused_before_any_worker(tmp_path: Path) -> None:
    """R x S ranks need R x S devices; every replica needs a row of every batch. Preflight,
    which runs before any worker starts, says so."""
    cfg = tiny_config(tmp_path, "pipeline.stages=2", "pipeline.replicas=2")
    with pytest.raises(ConfigError, match=r"2 x 2 = 4 ranks but only 3 GPU\(s\)"):
        preflight(cfg, placement=Placement(gpus=3, gpus_per_node=3))
    odd = tiny_config(tmp_path, "pipeline.stages=1", "pipeline.replicas=3", "data.train_limit=257")
    with pytest.raises(ConfigError, match="the last batch of each epoch has 1 rows"):
        preflight(odd)
    assert not any(tmp_path.iterdir())  # no run directory either


# --------------------------------------------------------------------------- multi-process

@pytest.fixture(scope="module")
def r2s2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The oracle: R = 2, S = 2 (4 spawned processes), 2 epochs of 5 batches, an uneven last
    batch; its checkpoints at steps 5 and 10 are kept."""
    tmp = tmp_path_factory.mktemp("r2s2")
    result = train(tiny_config(tmp, *_UNEVEN, "pipeline.stages=2", "pipeline.replicas=2"))
    return {"result": result, "state": checkpoint_tensors(result["run_dir"]),
            "run_dir": Path(result["run_dir"])}


def _copy_at(run_dir: Path, step: int, dest: Path) -> Path:
    """A copy of ``run_dir`` whose newest checkpoint is step ``step``: resumed runs write here."""
    shutil.copytree(run_dir, dest)
    keep = checkpoint_dir(dest, step)
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if ckpt != keep:
            shutil.rmtree(ckpt)
    (dest / "checkpoints" / "latest").write_text(keep.name)
    return dest


def _same_as(result: dict[str, Any], oracle: dict[str, Any]) -> None:
    assert result["step"] == oracle["result"]["step"] == 10
    assert_identical(checkpoint_tensors(result["run_dir"]), oracle["state"])
    assert result["test/acc"] == oracle["result"]["test/acc"]
    assert result["test/acc_local"] == oracle["result"]["test/acc_local"]


@pytest.mark.slow
def test_two_replicas_equal_on_one_and_two_stages_and_resume_exactly(
    r2s2: dict[str, Any], tmp_path: Path
) -> None:
    """R = 2: S = 1 equals S = 2 bitwise (dropout, BatchNorm, the uneven last batch); resumed
    from the S = 2 run's step-5 checkpoint, S = 1 ends bitwise as the straight run. The
    evaluation sharded over the replicas counts what one process counts for its checkpoint."""
    alone = evaluate_checkpoint(r2s2["run_dir"], [])
    assert alone["test/acc"] == r2s2["result"]["test/acc"]
    assert alone["test/acc_local"] == r2s2["result"]["test/acc_local"]
    straight = train(tiny_config(tmp_path / "s1", *_UNEVEN, "pipeline.stages=1",
                                 "pipeline.replicas=2"))
    _same_as(straight, r2s2)
    resumed_dir = _copy_at(r2s2["run_dir"], 5, tmp_path / "resumed")
    resumed = train(tiny_config(tmp_path / "unused", *_UNEVEN, "pipeline.stages=1",
                                "pipeline.replicas=2"), resume=resumed_dir)
    _same_as(resumed, r2s2)


@pytest.mark.slow
def test_a_two_replica_checkpoint_resumes_on_one_replica(
    r2s2: dict[str, Any], tmp_path: Path
) -> None:
    """The R = 2, S = 2 checkpoint of step 5 (replica 0's blocks) resumed by one process equals
    it resumed by an R = 1, S = 2 pipeline: an R = 1 run that loaded the same checkpoint."""
    one = train(tiny_config(tmp_path / "u1", *_UNEVEN, "pipeline.stages=1"),
                resume=_copy_at(r2s2["run_dir"], 5, tmp_path / "one"))
    two = train(tiny_config(tmp_path / "u2", *_UNEVEN, "pipeline.stages=2"),
                resume=_copy_at(r2s2["run_dir"], 5, tmp_path / "two"))
    assert one["step"] == two["step"] == 10
    assert_identical(checkpoint_tensors(one["run_dir"]), checkpoint_tensors(two["run_dir"]))
    assert one["test/acc"] == two["test/acc"]


@pytest.mark.slow
def test_torchrun_with_two_replicas_equals_the_spawned_run(
    r2s2: dict[str, Any], tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 ... --replicas 2`: 2 ranks, so 1 stage per replica; bitwise
    the spawned R = 2, S = 2 run."""
    sets = [*_tiny_sets(tmp_path / "tr"), "run.name=tr"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "pipelocal", "train", "--replicas", "2",
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipelined over 1 stages [4] x 2 replicas" in proc.stdout
    assert_identical(checkpoint_tensors(tmp_path / "tr" / "tr"), r2s2["state"])


def _tiny_sets(out_dir: Path) -> list[str]:
    from tests.conftest import tiny_overrides

    return [s for s in tiny_overrides(out_dir) if not s.startswith("run.threads")] + list(_UNEVEN)


@needs_ray
@pytest.mark.slow
def test_ray_actors_with_two_replicas_equal_the_spawned_run(
    r2s2: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("ray_cluster")
    result = train(tiny_config(tmp_path, *_UNEVEN, "pipeline.stages=1", "pipeline.replicas=2",
                               "pipeline.launcher=ray"))
    _same_as(result, r2s2)


@pytest.mark.slow
def test_two_replicas_average_to_the_whole_batch_step(tmp_path: Path) -> None:
    """One R = 2 step of rule pred on the MLP without batch statistics (no BatchNorm, no
    dropout; heads not zeroed, so that every body learns at once), batches of 63 rows split
    32 + 31, equals one single-process step on the whole
    batch to float tolerance (rtol 1e-5, atol 1e-6), not bitwise: the whole batch's mean
    gradient sums 63 rows' terms in one order, the replicas sum 32 and 31 of them and then add
    the two row-weighted sums, and float addition is not associative. SGD, because Adam's
    first step divides each gradient by its own magnitude, which turns a last-bit difference
    of a near-zero gradient into a whole step. lr = 1 makes a wrong weighting (an unweighted
    mean of the replicas' gradients) visible above that tolerance."""
    common = ("model.name=mlp", "model.hidden=32", "model.depth=2", "model.batchnorm=false",
              "model.dropout=0", "rule.name=pred", "optim.name=sgd", "optim.lr=1.0",
              "rule.zero_init=false", "data.batch_size=63", "run.max_steps=1", "run.epochs=1")
    two = train(tiny_config(tmp_path / "r2", *common, "pipeline.stages=1",
                            "pipeline.replicas=2"))
    one = train(tiny_config(tmp_path / "r1", *common, "pipeline.stages=1"))
    a, b = checkpoint_tensors(two["run_dir"]), checkpoint_tensors(one["run_dir"])
    for i in a:
        for key, t in a[i]["module"].items():
            assert torch.allclose(t, b[i]["module"][key], rtol=1e-5, atol=1e-6), (i, key)


@pytest.mark.slow
def test_a_perturbed_replica_is_caught_by_the_checkpoint_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica 1's first parameter drifts at step 2; the checkpoint of step 5 compares the
    replicas' checksums and stops the run naming the stage and the block; no manifest."""
    monkeypatch.setenv(FAULT_ENV, "1:2:perturb")  # rank 1 = replica 1, stage 0
    with pytest.raises(PipelineError) as info:
        train(tiny_config(tmp_path, "pipeline.stages=1", "pipeline.replicas=2",
                          "run.epochs=1", "run.name=bad"))
    message = str(info.value)
    assert "stage 0: the replicas hold different parameters of block 0 (conv1)" in message
    assert "at the checkpoint of step 5: replica(s) [1] differ from replica 0" in message
    assert not (tmp_path / "bad" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_killed_rank_of_replica_1_stops_the_run_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of rank 3 (replica 1, stage 1) at step 2: every rank stops within seconds and
    the error names it."""
    monkeypatch.setenv(FAULT_ENV, "3:2:kill")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        train(tiny_config(tmp_path, "pipeline.stages=2", "pipeline.replicas=2"))
    elapsed = time.monotonic() - t0
    assert "replica 1, stage 1 (rank 3, pid" in str(info.value)
    assert "died, killed by signal SIGKILL" in str(info.value)
    assert elapsed < 120, elapsed  # start-up of 4 processes included


@pytest.mark.slow
def test_sigterm_to_a_run_with_replicas_checkpoints_and_leaves_no_worker(tmp_path: Path) -> None:
    """SIGTERM to `pipelocal train --stages 1 --replicas 2` (a real process): the checkpoint at
    the current step, exit 130, both workers gone within seconds."""
    from pipelocal.checkpoint import read_manifest
    from pipelocal.cli import EXIT_INTERRUPTED
    from tests.test_supervision import (
        _PIPELOCAL,
        _assert_all_gone,
        _descendants,
        _start,
        _wait_for_checkpoint,
    )

    proc = _start([*_PIPELOCAL, "--stages", "1", "--replicas", "2"], tmp_path, "term")
    _wait_for_checkpoint(proc, tmp_path / "term")
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "x 2 replicas" in out and "terminated (SIGTERM): writing a checkpoint" in out, out
    assert f"stopped (interrupted) at step {read_manifest(tmp_path / 'term')['step']};" in out
    _assert_all_gone(workers)


@pytest.mark.slow
def test_a_frozen_replica_is_named_when_its_stage_group_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica 1 stops (SIGSTOP) at step 7; replica 0 waits for it in the gradient all-reduce,
    at most pipeline.timeout_s, and the frozen one is named at the batch where it froze.
    (8 s: the workers fork in milliseconds, and the tiny model's waits are far shorter.)"""
    monkeypatch.setenv(FAULT_ENV, "1:7:hang")
    with pytest.raises(PipelineError) as info:
        train(tiny_config(tmp_path, "pipeline.stages=1", "pipeline.replicas=2",
                          "pipeline.timeout_s=8"))
    message = str(info.value)
    assert "replica 1, stage 0 (rank 1, pid " in message, message
    assert "stopped answering, during training at epoch 2/2, batch 3 (step 7)" in message, \
        message
    assert "replica 0, stage 0 training at epoch 2/2, batch 3 (step 7)" in message, message
