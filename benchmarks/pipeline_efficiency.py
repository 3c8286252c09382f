"""Pipeline efficiency: does a 2-stage CPU pipeline reach 90% of its ideal throughput?

A 2-stage pipeline with one torch thread per stage (``pipeline.stages=2``,
``pipeline.threads_per_stage=1``) on a CPU with at least 2 cores can at best keep its slowest
stage computing all the time. From the stage statistics of the same run (``metrics.jsonl``),
for every epoch after the first (warm-up):

    batches          = stage samples / batch size    (the smaller last batch counts as a fraction)
    compute/batch_k  = stage k busy(s) / batches     (busy = time inside the engine's train/eval)
    ideal            = batch size / max_k compute/batch_k      [samples/s]
    achieved (wall)  = samples / stage0 wall(s)                [samples/s]   <- the verdict
    achieved (epoch) = samples / time/epoch(s)                 [samples/s]
    efficiency       = achieved / ideal  (= max_k busy_k / wall or epoch time)

Why ``wall(s)`` decides: a stage's ``busy(s)`` and ``wall(s)`` are both reset when it handles
END_EPOCH, so for epoch e they cover the same window: the evaluation after epoch e-1 (its
forward passes count as busy), the metric logging and the training batches of epoch e.
``time/epoch(s)`` covers only the training loop of epoch e, so dividing busy time that
includes an evaluation pass by it overstates the efficiency (it can exceed 1); it is reported
for reference only. No checkpoint is written inside a measured window (one at the end only).

The same configuration also runs in the single-process engine with one thread
(``pipeline.stages=1``, ``run.threads=1``) for a reference throughput; speed-up = pipeline
``time/epoch`` throughput / reference ``time/epoch`` throughput (both exclude evaluation).

The efficiency is relative to the stages' own busy times, measured as wall time: if other
processes take the cores, the stages compute more slowly, the ideal drops with them and the
efficiency can still look fine while the pipeline is no faster than one process. Read it
together with the speed-up, the load average recorded before and after, and ``cores used``
(CPU seconds of the stage processes / run wall time; near 2 on an otherwise idle 2-core CPU).

Default workload: MLP 4 x 1024 (each hidden block has a 1024 x 1024 sim head, so ~30 ms per block
and batch on one core) on mnist-10k (63 batches of 128 per epoch), rule predsim, partition
[2, 3] = fc1 fc2 | fc3 fc4 out (~60 ms per stage and batch). mnist-10k rather than digits: an
epoch of digits is only 12 batches, and every epoch boundary (and evaluation) drains and refills
the pipeline, which alone costs ~1/13 of the ideal there.

Final run (quiet machine, nothing else running; about 1 min per repeat, ~3-4 min in all):

    python benchmarks/pipeline_efficiency.py --epochs 4 --repeats 3

Quick smoke test (well under a minute; writes to /tmp):

    python benchmarks/pipeline_efficiency.py --epochs 2 --repeats 1 \
        --set data.train_limit=2000 --out /tmp/pipeline_efficiency.json

Result: ``benchmarks/results/pipeline_efficiency.json`` (``--out`` to change), then a table.
Exit status 1 if the lowest efficiency over the repeats is below ``--threshold``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (
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

from pipelocal.config import Config, config_to_dict, load_config
from pipelocal.run import train

NAME = "pipeline_efficiency"
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist-10k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs per run; the first is warm-up and not measured (default 4)")
    p.add_argument("--dataset", default="mnist-10k", help="data.name (default mnist-10k)")
    p.add_argument("--data-dir", default=str(MNIST_DIR), help="data.data_dir")
    p.add_argument("--model", default="mlp", help="model.name (default mlp)")
    p.add_argument("--hidden", type=int, default=1024, help="model.hidden (default 1024)")
    p.add_argument("--depth", type=int, default=4, help="model.depth (default 4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rule", default="predsim")
    p.add_argument("--partition", default="2,3",
                   help="blocks per stage, e.g. 2,3, or 'auto' to let pipelocal profile and "
                        "balance (default 2,3 = fc1 fc2 | fc3 fc4 out)")
    p.add_argument("--threshold", type=float, default=0.90,
                   help="required min. efficiency over the repeats (default 0.90)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the single-process reference runs")
    add_common_args(p, repeats=3)
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace, seed: int, out_dir: Path) -> list[str]:
    return [
        f"model.name={args.model}", f"model.hidden={args.hidden}", f"model.depth={args.depth}",
        f"data.name={args.dataset}", f"data.data_dir={args.data_dir!r}",
        f"data.batch_size={args.batch_size}", f"rule.name={args.rule!r}",
        f"run.epochs={args.epochs}", f"run.seed={seed}", "run.device=cpu",
        "run.progress=false", f"run.out_dir={str(out_dir)!r}",
        # One checkpoint, after the last record: none inside a measured window.
        f"run.checkpoint_every={args.epochs}",
    ]


def pipeline_config(args: argparse.Namespace, seed: int, out_dir: Path) -> Config:
    partition = "[]" if args.partition == "auto" else f"[{args.partition}]"
    return load_config(None, [
        *base_overrides(args, seed, out_dir), f"run.name=pipeline-seed{seed}",
        "pipeline.stages=2", "pipeline.threads_per_stage=1", f"pipeline.partition={partition}",
        *args.overrides,
    ])


def reference_config(args: argparse.Namespace, seed: int, out_dir: Path) -> Config:
    return load_config(None, [
        *base_overrides(args, seed, out_dir), f"run.name=reference-seed{seed}",
        "pipeline.stages=1", "run.threads=1",
        *args.overrides,
    ])


# --------------------------------------------------------------------------- analysis


def epoch_stats(rec: dict[str, Any], stages: int, batch_size: int) -> dict[str, Any]:
    """Efficiency of one epoch record of a pipelined run (see the module docstring)."""
    samples = [rec[f"stage{k}/samples"] for k in range(stages)]
    if len(set(samples)) != 1:
        raise ValueError(f"epoch {rec['epoch']}: stages report different sample counts {samples}")
    n = samples[0]
    batches = n / batch_size
    busy = [rec[f"stage{k}/busy(s)"] for k in range(stages)]
    per_batch = [b / batches for b in busy]
    ideal = batch_size / max(per_batch)
    wall0, t_epoch = rec["stage0/wall(s)"], rec["time/epoch(s)"]
    return {
        "epoch": rec["epoch"],
        "samples": n,
        "batches": batches,
        "busy(s)": busy,
        "compute_per_batch(ms)": [1000 * t for t in per_batch],
        "wall(s)": [rec[f"stage{k}/wall(s)"] for k in range(stages)],
        "recv_wait(s)": [rec[f"stage{k}/recv_wait(s)"] for k in range(stages)],
        "send_wait(s)": [rec[f"stage{k}/send_wait(s)"] for k in range(stages)],
        "time/epoch(s)": t_epoch,
        "ideal(samples/s)": ideal,
        "achieved_wall(samples/s)": n / wall0,
        "achieved_epoch(samples/s)": n / t_epoch,
        "efficiency_wall": n / wall0 / ideal,
        "efficiency_epoch": n / t_epoch / ideal,
    }


def run_stats(epochs: list[dict[str, Any]], stages: int) -> dict[str, Any]:
    """Pooled over the measured epochs: total samples over total time and total busy time."""
    n = sum(e["samples"] for e in epochs)
    busy = [sum(e["busy(s)"][k] for e in epochs) for k in range(stages)]
    wall0 = sum(e["wall(s)"][0] for e in epochs)
    t_epoch = sum(e["time/epoch(s)"] for e in epochs)
    ideal = n / max(busy)
    return {
        "samples": n,
        "busy(s)": busy,
        "ideal(samples/s)": ideal,
        "achieved_wall(samples/s)": n / wall0,
        "achieved_epoch(samples/s)": n / t_epoch,
        "efficiency_wall": n / wall0 / ideal,
        "efficiency_epoch": n / t_epoch / ideal,
        # What perfect overlap would give over running the stages' work one after another.
        "balance_bound_speedup": sum(busy) / max(busy),
    }


def pipeline_run(cfg: Config) -> dict[str, Any]:
    with cpu_meter() as usage:
        summary = train(cfg)
    records = read_metrics(summary["run_dir"])
    resolved = read_run_config(summary["run_dir"])  # holds the partition actually used
    stages = cfg.pipeline.stages
    if len(records) < 2:
        raise SystemExit("pipeline_efficiency: need --epochs >= 2 (the first is warm-up)")
    measured = [epoch_stats(r, stages, cfg.data.batch_size) for r in records[1:]]
    return {
        "seed": cfg.run.seed,
        "partition": resolved["pipeline"]["partition"],
        "pooled": run_stats(measured, stages),
        "epochs": measured,
        "warmup_epoch": records[0],
        "usage": usage,  # whole run: start-up, all epochs, evaluation, teardown
        "config": resolved,
    }


def reference_run(cfg: Config) -> dict[str, Any]:
    with cpu_meter() as usage:
        summary = train(cfg)
    records = read_metrics(summary["run_dir"])[1:]
    t = sum(r["time/epoch(s)"] for r in records)
    samples = sum(r["throughput(samples/s)"] * r["time/epoch(s)"] for r in records)
    return {
        "seed": cfg.run.seed,
        "throughput_epoch(samples/s)": samples / t,
        "epochs": records,
        "usage": usage,
        "config": config_to_dict(cfg),
    }


# --------------------------------------------------------------------------- main


def check_data(args: argparse.Namespace) -> None:
    if args.dataset == "mnist-10k" and not Path(args.data_dir).is_dir():
        sys.exit(f"pipeline_efficiency: mnist-10k is not at {args.data_dir}; pass --data-dir "
                 "FOLDER, or --dataset digits (short epochs: see the docstring)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_data(args)
    prov = Provenance(NAME)
    pipes: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    with run_root(args.runs_dir) as root:
        for seed in range(args.repeats):  # interleaved, so slow drift hits both alike
            print(f"== repeat {seed + 1}/{args.repeats}: pipeline", flush=True)
            pipes.append(pipeline_run(pipeline_config(args, seed, root)))
            if not args.no_reference:
                print(f"== repeat {seed + 1}/{args.repeats}: single-process reference",
                      flush=True)
                refs.append(reference_run(reference_config(args, seed, root)))

    def over_runs(key: str) -> dict[str, Any]:
        return summarize([p["pooled"][key] for p in pipes])

    summary: dict[str, Any] = {
        key: over_runs(key)
        for key in ("efficiency_wall", "efficiency_epoch", "ideal(samples/s)",
                    "achieved_wall(samples/s)", "achieved_epoch(samples/s)",
                    "balance_bound_speedup")
    }
    summary["efficiency_wall_per_epoch"] = summarize(
        [e["efficiency_wall"] for p in pipes for e in p["epochs"]])
    if refs:
        summary["reference(samples/s)"] = summarize(
            [r["throughput_epoch(samples/s)"] for r in refs])
        summary["speedup_epoch"] = summarize(
            [p["pooled"]["achieved_epoch(samples/s)"] / r["throughput_epoch(samples/s)"]
             for p, r in zip(pipes, refs)])
    passed = summary["efficiency_wall"]["min"] >= args.threshold
    payload = {
        "settings": {
            "model": args.model, "hidden": args.hidden, "depth": args.depth,
            "dataset": args.dataset, "batch_size": args.batch_size, "rule": args.rule,
            "stages": 2, "threads_per_stage": 1, "partition": args.partition,
            "epochs": args.epochs, "measured_epochs": args.epochs - 1,
            "repeats": args.repeats, "seeds": list(range(args.repeats)),
            "overrides": args.overrides,
        },
        "definitions": {
            "ideal": "batch_size / max_k(stage k busy(s) / batches) = samples / max_k busy_k",
            "efficiency_wall": "samples / stage0 wall(s) / ideal (the verdict; busy and wall "
                               "cover the same window, which includes the previous epoch's "
                               "evaluation)",
            "efficiency_epoch": "samples / time/epoch(s) / ideal (biased upwards: busy includes "
                                "the previous evaluation, time/epoch does not)",
            "pooled": "per run: sums over the measured epochs (all but the first)",
            "speedup_epoch": "pipeline samples / time/epoch(s) over the single-process "
                             "1-thread run's, same seed",
        },
        "check": {"threshold": args.threshold, "metric": "min over repeats of efficiency_wall",
                  "min_efficiency": summary["efficiency_wall"]["min"], "passed": passed},
        "summary": summary,
        "pipeline_runs": pipes,
        "reference_runs": refs,
    }
    path = write_result(prov, payload, args.out)

    print()
    rows = []
    for i, p in enumerate(pipes):
        q = p["pooled"]
        last = p["epochs"][-1]
        rows.append([
            p["seed"], p["partition"],
            " / ".join(f"{t:.1f}" for t in last["compute_per_batch(ms)"]),
            f"{q['ideal(samples/s)']:.0f}", f"{q['achieved_wall(samples/s)']:.0f}",
            f"{q['efficiency_wall']:.3f}", f"{q['efficiency_epoch']:.3f}",
            f"{refs[i]['throughput_epoch(samples/s)']:.0f}" if refs else "-",
            f"{q['achieved_epoch(samples/s)'] / refs[i]['throughput_epoch(samples/s)']:.2f}"
            if refs else "-",
            f"{p['usage']['cores_used']:.2f}",
        ])
    print(markdown_table(
        ["seed", "partition", "ms/batch per stage (last epoch)", "ideal samples/s",
         "achieved (wall) samples/s", "efficiency (wall)", "efficiency (epoch, biased)",
         "1-process samples/s", "speed-up", "cores used"],
        rows,
    ))
    print()
    print(markdown_table(
        ["metric", "mean ± std (min-max, n)"],
        [["efficiency (wall)", fmt_stat(summary["efficiency_wall"], 3)],
         ["efficiency (epoch, biased up)", fmt_stat(summary["efficiency_epoch"], 3)],
         ["speed-up over 1 process", fmt_stat(summary["speedup_epoch"], 2) if refs else "-"],
         ["balance bound on speed-up", fmt_stat(summary["balance_bound_speedup"], 2)]],
    ))
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{verdict}: min efficiency (wall) {summary['efficiency_wall']['min']:.3f} "
          f"vs threshold {args.threshold}")
    print(f"result: {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
