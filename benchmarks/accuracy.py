"""The accuracy runner: every recipe x rule x seed trained single-process, one record per run.

Not a benchmark of its own: ``mnist_realdata``, ``mostafa_mnist`` and the accuracy part of
``auglocal_resnet`` are presets of it (a base recipe of ``--set`` overrides, a table of rules,
the seeds) and keep their own summaries and checks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Provenance, read_metrics, require_mnist_10k, run_root
from pipelocal.config import Config, config_to_dict, load_config
from pipelocal.launch import train

__all__ = ["Record", "accuracy_record", "error_record", "run_grid", "run_rules"]

Record = Callable[[Config, list[dict[str, Any]], float], dict[str, Any]]
"""(resolved config, per-epoch records of ``metrics.jsonl``, wall seconds) -> one run's result."""


def _pct(acc: float | None, *, error: bool) -> float | None:
    if acc is None:
        return None
    return 100.0 * (1.0 - acc) if error else 100.0 * acc


def error_record(cfg: Config, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Test error in % of the output and of every hidden block's local classifier (last epoch),
    training time (the training loops only) and training throughput."""
    last = records[-1]
    train_s = sum(r["time/epoch(s)"] for r in records)
    # samples of each epoch = its throughput x its time (the record keeps both, not the count)
    samples = sum(r["throughput(samples/s)"] * r["time/epoch(s)"] for r in records)
    return {
        "rule": cfg.rule.name,
        "seed": cfg.run.seed,
        "test_err(%)": _pct(last["test/acc"], error=True),
        "local_test_err(%)": {k: _pct(v, error=True) for k, v in last["test/acc_local"].items()},
        "train_time(s)": round(train_s, 2),
        "wall_incl_eval(s)": round(wall, 2),
        "throughput(samples/s)": round(samples / max(train_s, 1e-9), 1),
        "epochs": records,
        "config": config_to_dict(cfg),
    }


def accuracy_record(label: str) -> Record:
    """Test accuracy in % of the output and of every block's auxiliary head (last epoch), under
    the rule's ``label`` (e.g. ``auglocal-d4``: one rule with several settings)."""

    def record(cfg: Config, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        return {
            "rule": label, "seed": cfg.run.seed,
            "test_acc(%)": _pct(records[-1]["test/acc"], error=False),
            "local_test_acc(%)": {k: _pct(v, error=False)
                                  for k, v in records[-1]["test/acc_local"].items()},
            "train_time(s)": round(sum(r["time/epoch(s)"] for r in records), 1),
            "wall(s)": round(wall, 1),
            "epochs": records,
            "config": config_to_dict(cfg),
        }

    return record


def run_grid(base: Sequence[str], rules: Mapping[str, Sequence[str]], seeds: Sequence[int], *,
             root: Path, epochs: int, overrides: Sequence[str] = (),
             record: Callable[[str], Record] = lambda _label: error_record
             ) -> list[dict[str, Any]]:
    """Train ``base`` + each rule's overrides for every seed (seed-major: all rules of seed 0,
    then seed 1, ...), single process, one checkpoint at the end, ``overrides`` applied last.

    ``rules`` maps a label (the run's name: ``<label>-seed<k>`` under ``root``) to its ``--set``
    overrides; ``record(label)`` turns a finished run into its result.
    """
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for label, rule in rules.items():
            print(f"== {label}, seed {seed}", flush=True)
            cfg = load_config(None, [
                *base, *rule, f"run.epochs={epochs}", f"run.seed={seed}", "pipeline.stages=1",
                f"run.out_dir={str(root)!r}", f"run.name={label.replace('+', '_')}-seed{seed}",
                f"run.checkpoint_every={epochs}",  # one checkpoint, at the end
                *overrides,
            ])
            t0 = time.perf_counter()
            summary = train(cfg)
            runs.append(record(label)(cfg, read_metrics(summary["run_dir"]),
                                      time.perf_counter() - t0))
    return runs


def run_rules(name: str, base: Sequence[str], args: argparse.Namespace) -> tuple[Provenance, list]:
    """A preset's usual grid on mnist-10k: ``args.rules`` x seeds ``0..args.repeats-1`` over
    ``base``, with the common arguments (data dir, runs dir, epochs, overrides)."""
    require_mnist_10k(args.data_dir, name)
    prov = Provenance(name)
    with run_root(args.runs_dir) as root:
        runs = run_grid(base, {r: [f"rule.name={r!r}"] for r in args.rules},
                        range(args.repeats), root=root, epochs=args.epochs,
                        overrides=args.overrides)
    return prov, runs
