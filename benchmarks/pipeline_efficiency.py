"""Pipeline efficiency: does a 2-stage CPU pipeline reach 90% of its ideal throughput?

A pass/fail gate on the pipeline runtime's own overhead (fill, drain, gathers, sends): the ideal
comes from the stages' busy times in the same run, so contention between the stages does not
count against it. The headline comparison with the alternatives, against the ideal measured
with each stage alone, is ``bench.py``.

A 2-stage pipeline with one torch thread per stage (``pipeline.stages=2``,
``pipeline.threads_per_stage=1``) on a CPU with at least 2 cores can at best keep its slowest
stage computing all the time. From the stage statistics of the same run (``metrics.jsonl``),
for every epoch after the first (warm-up):

    batches          = stage samples / batch size    (the smaller last batch counts as a fraction)
    compute/batch_k  = stage k busy(s) / batches     (busy = time inside the engine's train step)
    ideal            = batch size / max_k compute/batch_k      [samples/s]
    achieved         = samples / time/epoch(s)                 [samples/s]   <- the verdict
    efficiency       = achieved / ideal = max_k busy_k / time/epoch(s)

Why ``time/epoch(s)``: since pipelocal 105a06f a stage resets its timers after the evaluation
(and after a checkpoint), so ``busy(s)`` holds training compute only, and every training step of
every stage happens inside the trainer's epoch window (first batch fed -> END_EPOCH gathered from
all stages, which waits for the last stage to drain). So efficiency <= 1 and what it misses is
real cost: pipeline fill and drain, the end-of-epoch gather, stage 0's batch loading and
sends, communication. ``windows_consistent`` in the JSON says whether every measured epoch kept
efficiency <= 1; if not, the library's timer semantics changed again and the verdict is void.

Also reported, biased upwards: ``achieved (wall) = samples / stage0 wall(s)``. Stage 0's wall
clock stops when it hands END_EPOCH on, before the later stages have worked off the batches
still queued in the channels (``pipeline.channel_depth``), whose busy time they do count, so
this ratio can exceed 1. (Before 105a06f, busy and wall also held the previous epoch's
evaluation; results from such revisions are not comparable.) No checkpoint falls inside a
measured epoch: there is one, at the end.

The same configuration also runs in the single-process engine with one thread
(``pipeline.stages=1``, ``run.threads=1``) for a reference throughput; speed-up = pipeline
``time/epoch`` throughput / reference ``time/epoch`` throughput (both exclude evaluation).

The efficiency is relative to the stages' own busy times, measured as wall time: if other
processes take the cores, or the two stages slow each other down (shared cache and memory
bandwidth, vCPUs that are SMT siblings on the host), the stages compute more slowly, the ideal
drops with them and the efficiency can still look fine while the speed-up is low. Read it
together with the speed-up, the load average recorded before and after, and ``cores used``
(CPU seconds of the stage processes / run wall time; near 2 on an otherwise idle 2-core CPU).

Default workload: MLP 4 x 1024 (each hidden block has a 1024 x 1024 sim head, so ~30 ms per block
and batch on one core) on mnist-10k (63 batches of 128 per epoch), rule predsim, partition
[2, 3] = fc1 fc2 | fc3 fc4 out (~60 ms per stage and batch). mnist-10k rather than digits: an
epoch of digits is only 12 batches, and every epoch boundary (and evaluation) drains and refills
the pipeline, which alone costs ~1/13 of the ideal there.

The committed result (the machine and its load are in the result file):

    python -m benchmarks pipeline_efficiency --epochs 4 --repeats 3

Quick smoke test (well under a minute; writes to /tmp):

    python -m benchmarks pipeline_efficiency --epochs 2 --repeats 1 \
        --set data.train_limit=2000 --out /tmp/pipeline_efficiency.json

``--launchers spawn,ray`` runs the same workload as spawned processes and as Ray actors (one Ray
instance, started before the first run), interleaved within each repeat; both feed the same gloo
channel, so a difference is start-up and scheduling, not the data path. The launcher comparison
committed as ``results/ray_vs_spawn.json``:

    python -m benchmarks pipeline_efficiency --launchers spawn,ray --no-reference \
        --epochs 3 --repeats 2 --set data.train_limit=4000 \
        --out benchmarks/results/ray_vs_spawn.json

Result: ``benchmarks/results/pipeline_efficiency.json`` (``--out`` to change), then a table per
launcher; with several launchers ``summary``, ``runs`` and ``check`` are keyed by launcher.
Exit status 1 if the lowest efficiency over the repeats is below ``--threshold`` (for any
launcher).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MNIST_10K_DIR,
    Provenance,
    add_common_args,
    cpu_meter,
    fmt_stat,
    markdown_table,
    read_metrics,
    read_run_config,
    require_mnist_10k,
    run_root,
    summarize,
    write_result,
)
from pipelocal.config import Config, config_to_dict, load_config
from pipelocal.launch import train

NAME = "pipeline_efficiency"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="epochs per run; the first is warm-up and not measured (default 4)",
    )
    p.add_argument("--dataset", default="mnist-10k", help="data.name (default mnist-10k)")
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR), help="data.data_dir")
    p.add_argument("--model", default="mlp", help="model.name (default mlp)")
    p.add_argument("--hidden", type=int, default=1024, help="model.hidden (default 1024)")
    p.add_argument("--depth", type=int, default=4, help="model.depth (default 4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rule", default="predsim")
    p.add_argument(
        "--partition",
        default="2,3",
        help="blocks per stage, e.g. 2,3, or 'auto' to let pipelocal profile and "
        "balance (default 2,3 = fc1 fc2 | fc3 fc4 out)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.90,
        help="required min. efficiency over the repeats (default 0.90)",
    )
    p.add_argument(
        "--no-reference", action="store_true", help="skip the single-process reference runs"
    )
    p.add_argument(
        "--launchers",
        default="spawn",
        help="pipeline.launcher values to compare, interleaved within each repeat, e.g. "
        "spawn,ray (default spawn); with more than one, summary, runs and check are per launcher",
    )
    add_common_args(p, repeats=3)
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace, seed: int, out_dir: Path) -> list[str]:
    return [
        f"model.name={args.model}",
        f"model.hidden={args.hidden}",
        f"model.depth={args.depth}",
        f"data.name={args.dataset}",
        f"data.data_dir={args.data_dir!r}",
        f"data.batch_size={args.batch_size}",
        f"rule.name={args.rule!r}",
        f"run.epochs={args.epochs}",
        f"run.seed={seed}",
        "run.device=cpu",
        "run.progress=false",
        f"run.out_dir={str(out_dir)!r}",
        # One checkpoint, after the last record: none inside a measured window.
        f"run.checkpoint_every={args.epochs}",
    ]


def pipeline_config(args: argparse.Namespace, seed: int, out_dir: Path,
                    launcher: str = "spawn") -> Config:
    partition = "[]" if args.partition == "auto" else f"[{args.partition}]"
    return load_config(
        None,
        [
            *base_overrides(args, seed, out_dir),
            f"run.name=pipeline-seed{seed}",
            "pipeline.stages=2",
            f"pipeline.launcher={launcher}",
            "pipeline.threads_per_stage=1",
            f"pipeline.partition={partition}",
            *args.overrides,
        ],
    )


def reference_config(args: argparse.Namespace, seed: int, out_dir: Path) -> Config:
    return load_config(
        None,
        [
            *base_overrides(args, seed, out_dir),
            f"run.name=reference-seed{seed}",
            "pipeline.stages=1",
            "run.threads=1",
            *args.overrides,
        ],
    )


# --------------------------------------------------------------------------- analysis


def _rates(n: float, busy: list[float], wall0: float, t_epoch: float) -> dict[str, float]:
    """Ideal and achieved throughput and efficiency from samples, busy and elapsed times."""
    ideal = n / max(busy)  # = batch size / slowest stage's compute time per batch
    return {
        "ideal(samples/s)": ideal,
        "achieved_wall(samples/s)": n / wall0,
        "achieved_epoch(samples/s)": n / t_epoch,
        "efficiency": n / t_epoch / ideal,
        "efficiency_wall": n / wall0 / ideal,
    }


def epoch_stats(rec: dict[str, Any], stages: int, batch_size: int) -> dict[str, Any]:
    """Efficiency of one epoch record of a pipelined run (see the module docstring)."""
    samples = [rec[f"stage{k}/samples"] for k in range(stages)]
    if len(set(samples)) != 1:
        raise ValueError(f"epoch {rec['epoch']}: stages report different sample counts {samples}")
    n = samples[0]
    batches = n / batch_size
    busy = [rec[f"stage{k}/busy(s)"] for k in range(stages)]
    per_batch = [b / batches for b in busy]
    walls = [rec[f"stage{k}/wall(s)"] for k in range(stages)]
    wall0, t_epoch = walls[0], rec["time/epoch(s)"]
    return {
        "epoch": rec["epoch"],
        "samples": n,
        "batches": batches,
        "busy(s)": busy,
        "compute_per_batch(ms)": [1000 * t for t in per_batch],
        "wall(s)": walls,
        "recv_wait(s)": [rec[f"stage{k}/recv_wait(s)"] for k in range(stages)],
        "send_wait(s)": [rec[f"stage{k}/send_wait(s)"] for k in range(stages)],
        "time/epoch(s)": t_epoch,
        **_rates(n, busy, wall0, t_epoch),
        "utilisation": [b / w for b, w in zip(busy, walls)],
    }


def run_stats(epochs: list[dict[str, Any]], stages: int) -> dict[str, Any]:
    """Pooled over the measured epochs: total samples over total time and total busy time."""
    n = sum(e["samples"] for e in epochs)
    busy = [sum(e["busy(s)"][k] for e in epochs) for k in range(stages)]
    wall0 = sum(e["wall(s)"][0] for e in epochs)
    t_epoch = sum(e["time/epoch(s)"] for e in epochs)
    return {
        "samples": n,
        "busy(s)": busy,
        **_rates(n, busy, wall0, t_epoch),
        # What perfect overlap would give over running the stages' work one after another.
        "balance_bound_speedup": sum(busy) / max(busy),
    }


def pipeline_run(cfg: Config) -> dict[str, Any]:
    with cpu_meter() as usage:
        summary = train(cfg)
    records = read_metrics(summary["run_dir"])
    resolved = read_run_config(summary["run_dir"])  # holds the partition actually used
    stages = cfg.pipeline.stages
    measured = [epoch_stats(r, stages, cfg.data.batch_size) for r in records[1:]]
    if cfg.pipeline.launcher == "ray":
        usage = None  # children of this process only: Ray actors are not
    return {
        "seed": cfg.run.seed,
        "launcher": cfg.pipeline.launcher,
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
    if args.dataset == "mnist-10k":
        require_mnist_10k(args.data_dir, NAME)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    if args.epochs < 2:
        sys.exit(
            f"{NAME}: --epochs {args.epochs} leaves nothing to measure; the first epoch is "
            "warm-up, use --epochs 2 or more"
        )
    unknown = [x for x in launchers if x not in ("spawn", "ray")] or (not launchers and ["''"])
    if unknown:
        sys.exit(f"{NAME}: --launchers {args.launchers!r}: {', '.join(unknown)} is not a "
                 "launcher; accepted: spawn, ray (comma-separated)")
    check_data(args)
    prov = Provenance(NAME)
    pipes: dict[str, list[dict[str, Any]]] = {name: [] for name in launchers}
    refs: list[dict[str, Any]] = []
    with run_root(args.runs_dir) as root, _ray_if(launchers):
        for seed in range(args.repeats):  # interleaved, so slow drift hits all alike
            for name in launchers:
                print(f"== repeat {seed + 1}/{args.repeats}: pipeline ({name})", flush=True)
                pipes[name].append(pipeline_run(pipeline_config(args, seed, root / name, name)))
            if not args.no_reference:
                print(f"== repeat {seed + 1}/{args.repeats}: single-process reference", flush=True)
                refs.append(reference_run(reference_config(args, seed, root)))

    checks = {name: gate(rs, refs, args.threshold) for name, rs in pipes.items()}
    passed = all(c["passed"] for c, _ in checks.values())
    payload = {
        "settings": {
            "model": args.model,
            "hidden": args.hidden,
            "depth": args.depth,
            "dataset": args.dataset,
            "batch_size": args.batch_size,
            "rule": args.rule,
            "stages": 2,
            "threads_per_stage": 1,
            "partition": args.partition,
            "epochs": args.epochs,
            "measured_epochs": args.epochs - 1,
            "repeats": args.repeats,
            "seeds": list(range(args.repeats)),
            "launchers": launchers,
            "overrides": args.overrides,
        },
        "definitions": {
            "batches": "stage samples / batch_size",
            "ideal": "batch_size / max_k(stage k busy(s) / batches) = samples / max_k busy_k",
            "efficiency": "samples / time/epoch(s) / ideal = max_k busy_k / time/epoch(s) (the "
            "verdict; busy holds training compute only, all of it inside the epoch window)",
            "efficiency_wall": "samples / stage0 wall(s) / ideal (biased upwards: stage 0's "
            "wall stops before the later stages drain their queued batches)",
            "utilisation": "per stage: busy(s) / its own wall(s)",
            "pooled": "per run: sums over the measured epochs (all but the first)",
            "speedup": "pipeline samples / time/epoch(s) over the single-process 1-thread "
            "run's, same seed",
            "balance_bound_speedup": "sum_k busy_k / max_k busy_k: the speed-up of perfect "
            "overlap with this partition",
        },
    }
    if len(launchers) == 1:  # the gate's own layout
        (check, summary), = checks.values()
        payload.update(check=check, summary=summary, pipeline_runs=pipes[launchers[0]],
                       reference_runs=refs)
    else:  # the launcher comparison: per launcher, as results/ray_vs_spawn.json
        payload.update(
            check={name: c for name, (c, _) in checks.items()},
            summary={name: {"throughput(samples/s)": s["achieved_epoch(samples/s)"], **s}
                     for name, (_, s) in checks.items()},
            runs=pipes, reference_runs=refs)
    path = write_result(prov, payload, args.out)
    for name, (check, summary) in checks.items():
        print(f"\n## launcher {name}")
        print_tables(pipes[name], refs, summary)
        verdict = "PASS" if check["passed"] else "FAIL"
        print(
            f"\n{verdict}: min efficiency {check['min_efficiency']:.3f} vs threshold "
            f"{args.threshold}"
            + ("" if check["windows_consistent"]
               else " (an epoch's efficiency exceeds 1: timer windows differ)")
        )
    print(f"result: {path}")
    return 0 if passed else 1


def gate(pipes: list[dict[str, Any]], refs: list[dict[str, Any]], threshold: float
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The check and the summary of one launcher's runs."""
    summary = summarize_runs(pipes, refs)
    consistent = all(e["efficiency"] <= 1.0 + 1e-3 for p in pipes for e in p["epochs"])
    check = {
        "threshold": threshold,
        "metric": "min over repeats of the pooled efficiency",
        "min_efficiency": summary["efficiency"]["min"],
        "windows_consistent": consistent,
        "passed": consistent and summary["efficiency"]["min"] >= threshold,
    }
    return check, summary


@contextmanager
def _ray_if(launchers: list[str]) -> Iterator[None]:
    """One local Ray instance for all runs when ``ray`` is among the launchers (its start-up
    is then in no epoch); shut down at the end."""
    if "ray" not in launchers:
        yield
        return
    import ray

    from pipelocal.launch.ray import start_local

    start_local(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def summarize_runs(pipes: list[dict[str, Any]], refs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "efficiency",
        "efficiency_wall",
        "ideal(samples/s)",
        "achieved_epoch(samples/s)",
        "achieved_wall(samples/s)",
        "balance_bound_speedup",
    )
    summary: dict[str, Any] = {k: summarize([p["pooled"][k] for p in pipes]) for k in keys}
    summary["efficiency_per_epoch"] = summarize(
        [e["efficiency"] for p in pipes for e in p["epochs"]]
    )
    if refs:
        summary["reference(samples/s)"] = summarize(
            [r["throughput_epoch(samples/s)"] for r in refs]
        )
        summary["speedup"] = summarize([speedup(p, r) for p, r in zip(pipes, refs)])
    return summary


def speedup(pipe: dict[str, Any], ref: dict[str, Any]) -> float:
    return pipe["pooled"]["achieved_epoch(samples/s)"] / ref["throughput_epoch(samples/s)"]


def print_tables(
    pipes: list[dict[str, Any]], refs: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    rows = []
    for i, p in enumerate(pipes):
        q = p["pooled"]
        rows.append(
            [
                p["seed"],
                p["partition"],
                " / ".join(f"{t:.1f}" for t in p["epochs"][-1]["compute_per_batch(ms)"]),
                f"{q['ideal(samples/s)']:.0f}",
                f"{q['achieved_epoch(samples/s)']:.0f}",
                f"{q['efficiency']:.3f}",
                f"{q['efficiency_wall']:.3f}",
                f"{refs[i]['throughput_epoch(samples/s)']:.0f}" if refs else "-",
                f"{speedup(p, refs[i]):.2f}" if refs else "-",
                f"{p['usage']['cores_used']:.2f}" if p["usage"] else "-",
            ]
        )
    headers = [
        "seed",
        "partition",
        "ms/batch per stage (last epoch)",
        "ideal samples/s",
        "achieved samples/s",
        "efficiency",
        "efficiency (wall, biased up)",
        "1-process samples/s",
        "speed-up",
        "cores used",
    ]
    print()
    print(markdown_table(headers, rows))
    print()
    stat_rows = [
        ["efficiency", fmt_stat(summary["efficiency"], 3)],
        ["efficiency per epoch", fmt_stat(summary["efficiency_per_epoch"], 3)],
        ["efficiency (wall, biased up)", fmt_stat(summary["efficiency_wall"], 3)],
        ["speed-up over 1 process", fmt_stat(summary["speedup"], 2) if refs else "-"],
        ["balance bound on speed-up", fmt_stat(summary["balance_bound_speedup"], 2)],
    ]
    print(markdown_table(["metric", "mean ± std (min-max, n)"], stat_rows))


if __name__ == "__main__":
    sys.exit(main())
