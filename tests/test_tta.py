"""The time-to-accuracy benchmark (benchmarks/headline/tta.py): its figures from hand-made
records, and one ``--quick`` run of the whole command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.headline.scaling import BlockCost, Link
from benchmarks.headline.tta import (
    PREDICTED,
    configs,
    curve,
    equal_time,
    parse_args,
    predictions,
    same_accuracy,
    targets,
    time_to,
)
from tests.conftest import MNIST_10K, REPO


def _records(epoch_s: float, accs: list[float]) -> list[dict[str, float]]:
    """Metrics records of a run: ``epoch_s`` training seconds per epoch, these test accuracies."""
    return [{"epoch": i + 1, "time/epoch(s)": epoch_s, "test/acc": a}
            for i, a in enumerate(accs)]


def _curves(epoch_s: float, *per_seed: list[float]) -> dict[str, list[dict[str, float]]]:
    return {str(seed): curve(_records(epoch_s, accs)) for seed, accs in enumerate(per_seed)}


def test_a_curve_accumulates_training_time_per_evaluation():
    pts = curve(_records(2.5, [0.5, 0.7, 0.6]))
    assert [p["train_time(s)"] for p in pts] == [2.5, 5.0, 7.5]
    assert [(p["epoch"], p["test/acc"]) for p in pts] == [(1, 0.5), (2, 0.7), (3, 0.6)]


def test_targets_sit_below_the_median_of_each_seeds_best_glob_accuracy():
    goal = targets(_curves(1.0, [0.90, 0.95, 0.94], [0.97, 0.93]))  # bests 0.95 and 0.97
    assert goal["glob_best"] == pytest.approx(0.96)
    assert goal["best-1pt"] == pytest.approx(0.95)
    assert goal["best-0.5pt"] == pytest.approx(0.955)


def test_time_to_target_per_seed_and_none_where_never_reached():
    t = time_to(_curves(3.0, [0.80, 0.95, 0.96], [0.90, 0.91, 0.92]), 0.95)
    assert t["per_seed"] == {"0": {"train_time(s)": 6.0, "epoch": 2}, "1": None}
    assert (t["reached"], t["n"]) == (1, 2)
    assert t["train_time(s)"]["median"] == 6.0 and t["train_time(s)"]["n"] == 1
    never = time_to(_curves(3.0, [0.5], [0.6]), 0.95)
    assert never["train_time(s)"] is None and never["reached"] == 0


def test_equal_time_takes_the_last_evaluation_at_or_before_the_shortest_run():
    curves = {
        "glob S=1": _curves(4.0, [0.90, 0.95]),  # 8 s in all: the horizon
        "pred S=1": _curves(3.0, [0.85, 0.88, 0.93]),  # at 8 s: the 6 s evaluation
        "pred S=2": _curves(10.0, [0.99]),  # nothing evaluated by 8 s
    }
    eq = equal_time(curves)
    assert eq["horizon(s)"] == 8.0
    assert eq["test/acc"]["glob S=1"] == {"per_seed": {"0": 0.95}, "median": 0.95}
    assert eq["test/acc"]["pred S=1"]["median"] == 0.88
    assert eq["test/acc"]["pred S=2"] == {"per_seed": {"0": None}, "median": None}


def test_same_accuracy_compares_every_s_with_the_first_seed_by_seed():
    curves = {"glob S=1": _curves(1.0, [0.9]),
              "pred S=1": _curves(2.0, [0.8, 0.9], [0.7]),
              "pred S=2": _curves(1.0, [0.8, 0.9], [0.7]),  # faster, same accuracies
              "sym S=1": _curves(2.0, [0.8]),
              "sym S=2": _curves(2.0, [0.81])}
    assert same_accuracy(curves) == {"pred": True, "sym": False}  # glob: one S only


def _table(n: int, local_s: float = 0.1) -> list[BlockCost]:
    return [BlockCost(name=f"b{i}", local_s=local_s, glob_s=local_s, wire_bytes=0,
                      saved_local_bytes=0, saved_glob_bytes=0, state_local_bytes=0,
                      state_glob_bytes=0) for i in range(n)]


def test_predictions_scale_the_epochs_s2_needed_by_the_models_epoch_time():
    goal = {"glob_best": 0.96, "best-1pt": 0.95, "best-0.5pt": 0.955}
    curves = {"pred S=2": _curves(5.0, [0.90, 0.951, 0.96], [0.951, 0.952, 0.953])}
    # 4 blocks of 0.1 s, no wire bytes: S = 4 -> 0.1 s a batch, an epoch of 10 batches =
    # 0.4 (fill) + 9 x 0.1 = 1.3 s.
    rows = predictions(curves, goal, {"pred": _table(4), "sym": _table(4)}, stages=(4, 8),
                       batch_size=32, batches=10, link=Link(latency_s=0.0, bytes_per_s=1e9),
                       channel_depth=2)
    by = {(r["S"], r["target"]): r for r in rows}
    assert {r["rule"] for r in rows} == {"pred"}  # sym has no S = 2 run
    assert all(r["kind"] == PREDICTED for r in rows)
    s4 = by[(4, "best-1pt")]
    assert s4["epochs_at_S2"] == 1.5  # epochs 2 and 1: the median
    assert s4["epoch(s)"] == pytest.approx(1.3)
    assert s4["train_time(s)"] == pytest.approx(1.5 * 1.3)
    assert "epoch(s)" not in by[(4, "best-0.5pt")]  # seed 1 never reached 0.955
    assert "reached it in 1 of 2 seeds" in by[(4, "best-0.5pt")]["not_reached"]
    assert "S=8 > 4 blocks" in by[(8, "best-1pt")]["impossible"]


def test_glob_always_runs_once_and_the_local_rules_at_every_s():
    args = parse_args(["--rules", "pred,sym", "--stages", "1,2"])
    assert configs(args) == [("glob", 1), ("pred", 1), ("pred", 2), ("sym", 1), ("sym", 2)]
    with pytest.raises(SystemExit):
        parse_args(["--rules", "glob,pred"])
    with pytest.raises(SystemExit):
        parse_args(["--models", "resnet"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_quick_command_writes_every_configuration(tmp_path: Path):
    if not MNIST_10K.is_dir():
        pytest.skip(f"mnist-10k not found at {MNIST_10K} (only on project machines)")
    cmd = [sys.executable, "-m", "benchmarks", "tta", "--quick", "--models", "mlp", "--seeds",
           "0", "--rules", "pred", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "tta.json").read_text())
    model = result["models"]["mlp"]
    keys = {"glob S=1", "pred S=1", "pred S=2"}
    assert set(model["raw"]["runs"]) == keys == set(model["time_to_target"])
    assert all(len(model["curves"][k]["0"]) == 2 for k in keys)  # 2 epochs, each evaluated
    assert result["complete"] and result["git"]["commit"]
    assert {r["S"] for r in model["predictions"]} == {4, 8}
    assert model["same_accuracy_every_S"] == {"pred": True}  # 2 stages = 1 device, exactly
    assert "[tta] run 3/3" in proc.stdout
    assert (tmp_path / "tta.md").read_text().startswith("# Time to accuracy")
    assert (tmp_path / "tta.png").stat().st_size > 0
