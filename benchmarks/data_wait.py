"""Data wait: how long stage 0 waits for training batches per epoch, prefetch off vs on.

The trainer on rank 0 logs ``data_wait(s)`` in every epoch record of ``metrics.jsonl``: the
time its thread spent in ``next()`` on the epoch's batches, i.e. building each batch itself
(``data.prefetch=0``) or waiting for the prefetch thread (``data.prefetch=N``). This script runs
the same workload with both settings through the command line (``python -m pipelocal train``),
interleaved (off, on, off, on, ...; repeat k uses seed k for both), and reads that figure.

Workload (defaults): CIFAR-shaped batches of 128 from ``synthetic-cifar`` (uniform random uint8
images [3, 32, 32], generated, no download), augmentation ``padcrop`` + ``flip``, the first 2560
training images (20 batches per epoch), 2 epochs, an MLP of 2 x 512 hidden units with rule
predsim, a 2-stage pipeline ``[1, 2]`` (fc1 | fc2 out) with one torch thread per stage. The model
is small on purpose: its per-batch compute is of the order of a batch's construction, the case
in which feeding the pipeline matters.

Also recorded: the time to build one batch on this CPU (``batch_build(ms)``, in this process,
one thread), ``time/epoch(s)`` and ``stage0/busy(s)`` per epoch, and per run the CPU use.

The committed result (the machine was shared with other jobs, see ``note`` and the load
averages in the file):

    python -m benchmarks data_wait --repeats 3 --note "..."

Result: ``benchmarks/results/data_wait.json`` (``--out`` to change), then a table. Exit status 1
if prefetching does not lower the mean data wait.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    Provenance,
    add_common_args,
    cpu_meter,
    fmt_stat,
    markdown_table,
    read_metrics,
    read_run_config,
    run_root,
    summarize,
    write_result,
)

NAME = "data_wait"
_EPOCH_KEYS = ("data_wait(s)", "time/epoch(s)", "stage0/busy(s)", "stage1/busy(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=2560, help="training images used")
    p.add_argument("--prefetch", type=int, default=2, help="data.prefetch of the 'on' runs")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per training run")
    p.add_argument("--note", default="", help="run conditions, stored in the result")
    add_common_args(p, repeats=3)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, prefetch: int, seed: int, out_dir: Path) -> list[str]:
    return [
        "data.name=synthetic-cifar", 'data.augment=["padcrop", "flip"]',
        f"data.train_limit={args.train_limit}", "data.batch_size=128",
        "model.name=mlp", "model.hidden=512", "model.depth=2", "rule.name=predsim",
        "pipeline.stages=2", "pipeline.partition=[1, 2]", "pipeline.threads_per_stage=1",
        f"run.epochs={args.epochs}", f"run.seed={seed}", "run.progress=false",
        f"run.out_dir={out_dir}", f"run.name=prefetch{prefetch}-seed{seed}",
        f"data.prefetch={prefetch}", *args.overrides,
    ]


def train_run(args: argparse.Namespace, prefetch: int, seed: int, root: Path) -> dict[str, Any]:
    sets = overrides(args, prefetch, seed, root)
    cmd = [sys.executable, "-m", "pipelocal", "train"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's pipelocal
    with cpu_meter() as usage:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        sys.exit(f"{NAME}: training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = root / f"prefetch{prefetch}-seed{seed}"
    epochs = [{k: rec[k] for k in _EPOCH_KEYS} for rec in read_metrics(run_dir)]
    waits = [e["data_wait(s)"] for e in epochs]
    return {
        "prefetch": prefetch, "seed": seed, "overrides": sets, "usage": usage,
        "config": read_run_config(run_dir), "epochs": epochs,
        "mean_data_wait(s)": sum(waits) / len(waits),
    }


def batch_build_ms(args: argparse.Namespace, batches: int = 20) -> dict[str, Any]:
    """Time to build one augmented batch on this CPU with one torch thread (this process)."""
    import torch

    from pipelocal.config import DataConfig
    from pipelocal.data import load_dataset, make_loaders

    cfg = DataConfig(name="synthetic-cifar", augment=("padcrop", "flip"),
                     train_limit=args.train_limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader, _ = make_loaders(load_dataset(cfg), cfg, 0)
        times = []
        for i in range(min(batches, loader.num_batches(0))):
            t0 = time.perf_counter()
            loader.batch(0, i)
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return summarize(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prov = Provenance(NAME)
    build = batch_build_ms(args)
    runs: list[dict[str, Any]] = []
    with run_root(args.runs_dir) as root:
        for seed in range(args.repeats):
            for prefetch in (0, args.prefetch):  # interleaved: the load drifts over time
                runs.append(train_run(args, prefetch, seed, root))
                print(f"prefetch={prefetch} seed={seed}: data wait per epoch "
                      f"{[e['data_wait(s)'] for e in runs[-1]['epochs']]} s", flush=True)
    summary = {
        setting: {
            key: summarize([e[key] for r in runs if r["prefetch"] == p for e in r["epochs"]])
            for key in _EPOCH_KEYS
        }
        for setting, p in (("off", 0), ("on", args.prefetch))
    }
    off, on = (summary[s]["data_wait(s)"]["mean"] for s in ("off", "on"))
    payload = {
        "note": args.note,
        "settings": {"epochs": args.epochs, "train_limit": args.train_limit,
                     "repeats": args.repeats, "prefetch_on": args.prefetch,
                     "order": "interleaved off/on per seed"},
        "batch_build(ms)": build,
        "summary_per_epoch": summary,
        "check": {"criterion": "mean data_wait(s) per epoch lower with prefetch on",
                  "off(s)": off, "on(s)": on, "ratio_on_over_off": on / off, "passed": on < off},
        "runs": runs,
    }
    path = write_result(prov, payload, args.out)
    rows = [[s, fmt_stat(summary[s]["data_wait(s)"], 3), fmt_stat(summary[s]["time/epoch(s)"]),
             fmt_stat(summary[s]["stage0/busy(s)"])] for s in ("off", "on")]
    print(markdown_table(["prefetch", "data_wait(s)/epoch", "time/epoch(s)", "stage0 busy(s)"],
                         rows))
    print(f"one batch built in {fmt_stat(build, 1)} ms; result: {path}")
    return 0 if on < off else 1


if __name__ == "__main__":
    sys.exit(main())
