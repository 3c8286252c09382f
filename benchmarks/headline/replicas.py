"""Replicas beside data-parallel backprop: (e) DDP over R ranks, pipelocal R x 1 and 1 x R.

For each model and local rule, ``--repeats`` interleaved rounds of, on the same global batch
and threads per process (one each by default, R processes at a time):

    (e) backprop with DistributedDataParallel over R ranks     ddp.py
    pipelocal with R replicas of one stage   (--replicas R --stages 1)
    pipelocal with one pipeline of R stages  (--replicas 1 --stages R, the balanced split)

Throughput (samples/s of the measured second epoch for pipelocal, of N timed steps for DDP),
peak RSS per process, and the planner's prediction for each layout (pipelocal.pipeline.layout,
from block costs profiled here and the link measured here), with its error. Writes
``<name>.json`` and ``<name>.md`` to ``--out-dir`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MNIST_10K_DIR,
    RESULTS_DIR,
    Provenance,
    require_mnist_10k,
    write_result,
)
from benchmarks.headline.bench import Runner, pipelocal_stats, preset_for

__all__ = ["main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,vgg8b")
    p.add_argument("--rules", default="pred,predsim")
    p.add_argument("--replicas", type=int, default=2, help="R (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads-per-stage", type=int, default=1,
                   help="torch threads in every process (default 1)")
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR), help="mnist-10k folder")
    p.add_argument("--quick", action="store_true", help="tiny models and runs (a smoke test)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--name", default="replicas")
    p.add_argument("--note", default="", help="free text stored in the JSON (machine state)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra config override (repeatable)")
    args = p.parse_args(argv)
    args.stages = args.replicas  # Runner's threads default and the S of the pipeline layout
    return args


def _predictions(run: Runner, rule: str, replicas: int) -> dict[str, Any]:
    """The planner's layouts R x 1 and 1 x R and DDP over R, from costs profiled here."""
    import torch

    from pipelocal.data import load_dataset
    from pipelocal.launch.link_probe import measure_link
    from pipelocal.models import build_model
    from pipelocal.pipeline.layout import (
        largest_slice,
        predict_ddp,
        predict_layout,
        profile_costs,
    )
    from pipelocal.pipeline.partition import balanced_partition

    torch.set_num_threads(run.threads)
    cfg = run.config(rule)
    data = load_dataset(cfg.data)
    specs = build_model(cfg.model, data.in_shape, data.num_classes)
    costs = {rows: profile_costs(cfg, specs, data.num_classes, torch.device("cpu"), rows)
             for rows in {cfg.data.batch_size, largest_slice(cfg.data.batch_size, replicas)}}
    link = measure_link(run.threads)
    b, sliced = cfg.data.batch_size, costs[largest_slice(cfg.data.batch_size, replicas)]
    partition = balanced_partition([p.time_s for p in costs[b].blocks], replicas)
    concurrent = max(1, len(os.sched_getaffinity(0)) // run.threads)
    lay = {
        "replicas": predict_layout(sliced, batch=b, replicas=replicas, partition=[len(specs)],
                                   link=link, concurrent=concurrent),
        "stages": predict_layout(costs[b], batch=b, replicas=1, partition=partition, link=link,
                                 concurrent=concurrent),
        "ddp": predict_ddp(sliced, batch=b, replicas=replicas, link=link,
                           concurrent=concurrent),
    }
    return {"link": str(link), "partition": partition,
            **{k: {"samples/s": v.samples_s, "model_memory(MiB)": v.memory_bytes / 2**20}
               for k, v in lay.items()}}


def measure(args: argparse.Namespace, model: str, root: Path) -> dict[str, Any]:
    from benchmarks.headline.ddp import run_ddp

    preset = preset_for(model, args.quick)
    run = Runner(args, preset, root)
    r = args.replicas
    out: dict[str, Any] = {"label": preset.label, "overrides": run.base, "rules": {}}
    for rule in args.rules.split(","):
        pred = _predictions(run, rule, r)
        reps = []
        for i in range(args.repeats):
            print(f"[replicas] {model} {rule} repeat {i + 1}/{args.repeats}", flush=True)
            ddp = run_ddp(run.config("glob"), r, warmup=preset.warmup, steps=preset.steps,
                          threads=run.threads)
            rep = {"ddp": {"throughput(samples/s)": ddp[0]["throughput(samples/s)"],
                           "peak_rss(MiB)": [x["peak_rss(MiB)"] for x in ddp]}}
            n = sum(pred["partition"])
            for key, (replicas, partition) in {"replicas": (r, [n]),
                                               "stages": (1, pred["partition"])}.items():
                stats = pipelocal_stats(run.pipelocal(rule, f"{model}-{rule}-{key}-{i}", 2,
                                                      preset.pipe_batches, partition,
                                                      replicas=replicas), len(partition))
                rep[key] = {"throughput(samples/s)": stats["throughput(samples/s)"],
                            "peak_rss(MiB)": stats["peak_rss(MiB)"],
                            "command": stats["command"]}
            reps.append(rep)
        med = {k: statistics.median(rep[k]["throughput(samples/s)"] for rep in reps)
               for k in ("ddp", "replicas", "stages")}
        out["rules"][rule] = {
            "repeats": reps, "median(samples/s)": med,
            "vs_ddp": {k: med[k] / med["ddp"] for k in ("replicas", "stages")},
            "predicted": pred,
            "prediction_error": {k: pred[k]["samples/s"] / med[k] - 1
                                 for k in ("ddp", "replicas", "stages")},
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    r = result["settings"]["replicas"]
    lines = [f"# Replicas beside data-parallel backprop (R = {r})", "",
             f"Command: `{result['command']}`; git {(result['git']['commit'] or '?')[:10]}; "
             f"{result['machine_note']}.", "",
             "| model | rule | layout | samples/s (median) | vs DDP | planner | error | "
             "peak RSS per process (MiB) |", "|---|---|---|---:|---:|---:|---:|---|"]
    names = {"ddp": f"(e) DDP backprop, {r} ranks", "replicas": f"pipelocal {r} x 1",
             "stages": f"pipelocal 1 x {r}"}
    for model in result["models"].values():
        for rule, res in model["rules"].items():
            for key, name in names.items():
                rss = [max(rep[key]["peak_rss(MiB)"] or [0]) for rep in res["repeats"]]
                vs = 1.0 if key == "ddp" else res["vs_ddp"][key]
                lines.append(
                    f"| {model['label']} | {rule} | {name} | {res['median(samples/s)'][key]:,.0f}"
                    f" | {vs:.2f} | {res['predicted'][key]['samples/s']:,.0f} | "
                    f"{100 * res['prediction_error'][key]:+.0f}% | {max(rss):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_mnist_10k(args.data_dir, "replicas")
    prov = Provenance(args.name)
    models = {}
    with tempfile.TemporaryDirectory(prefix="pipelocal-replicas-") as tmp:
        for model in args.models.split(","):
            models[model] = measure(args, model, Path(tmp))
    loads = prov.load_before
    note = args.note or (f"1-minute load average {loads[0]:.1f} before the run"
                         if loads else "")
    out = Path(args.out_dir)
    path = write_result(prov, {"settings": vars(args), "machine_note": note,
                               "models": models}, out / f"{args.name}.json")
    text = markdown(json.loads(path.read_text()))
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
