"""Ray actors against spawned processes: the same 2-stage CPU pipeline, the same worker body.

For each repeat (seed), the workload of ``pipeline_efficiency.py`` (MLP 4 x 1024, predsim,
mnist-10k, batch 128, partition [2, 3], one torch thread per stage) runs once with
``pipeline.launcher = spawn`` and once with ``ray``, interleaved so that drift in the machine's
load hits both alike. Throughput = samples / time/epoch(s) of the epochs after the first
(warm-up), from each run's ``metrics.jsonl``; both launchers feed the same gloo channel, so a
difference is start-up and scheduling, not the data path. Efficiency as in
``pipeline_efficiency.py`` (max_k busy_k / time/epoch). The Ray instance is started once, here,
before the first run (its start-up is not in any epoch).

    python -m benchmarks ray_vs_spawn --epochs 3 --repeats 2 --set data.train_limit=4000

Result: ``benchmarks/results/ray_vs_spawn.json``, then a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from benchmarks.common import (
    MNIST_10K_DIR,
    Provenance,
    add_common_args,
    fmt_stat,
    markdown_table,
    run_root,
    summarize,
    write_result,
)
from benchmarks.pipeline_efficiency import check_data, pipeline_config, pipeline_run

NAME = "ray_vs_spawn"
LAUNCHERS = ("spawn", "ray")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="run.epochs (the first is warm-up)")
    p.add_argument("--dataset", default="mnist-10k")
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR))
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rule", default="predsim")
    p.add_argument("--partition", default="2,3", help="blocks per stage, or auto")
    add_common_args(p, repeats=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray

    from pipelocal.launch.ray import start_local

    args = parse_args(argv)
    if args.epochs < 2:
        sys.exit(f"{NAME}: --epochs {args.epochs} leaves nothing to measure; use 2 or more")
    check_data(args)
    prov = Provenance(NAME)
    start_local(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                log_to_driver=False)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LAUNCHERS}
    try:
        with run_root(args.runs_dir) as root:
            for seed in range(args.repeats):
                for name in LAUNCHERS:  # interleaved: spawn, ray, spawn, ray, ...
                    print(f"== repeat {seed + 1}/{args.repeats}: {name}", flush=True)
                    base = argparse.Namespace(**{**vars(args), "overrides": [
                        *args.overrides, f"pipeline.launcher={name}"]})
                    cfg = pipeline_config(base, seed, root / name)
                    run = pipeline_run(cfg)
                    run.pop("usage")  # children of this process only: Ray actors are not
                    runs[name].append(run)
    finally:
        ray.shutdown()
    summary = {name: {
        "throughput(samples/s)": summarize([r["pooled"]["achieved_epoch(samples/s)"] for r in rs]),
        "efficiency": summarize([r["pooled"]["efficiency"] for r in rs]),
    } for name, rs in runs.items()}
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir")},
        "machine_note": "2-core machine shared with other engineers' jobs while it ran (see "
                        "load_avg_1_5_15); absolute numbers are low and noisy, the two "
                        "launchers were interleaved so that both saw the same load",
        "definitions": {"throughput": "pooled samples / time/epoch(s), epochs after the first",
                        "efficiency": "max_k busy_k / time/epoch(s)"},
        "summary": summary,
        "runs": runs,
    }
    path = write_result(prov, payload, args.out)
    print(markdown_table(
        ["launcher", "throughput (samples/s)", "efficiency"],
        [[name, fmt_stat(s["throughput(samples/s)"], 1), fmt_stat(s["efficiency"], 3)]
         for name, s in summary.items()]))
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
