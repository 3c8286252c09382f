"""AugLocal vs DGL, InfoPro, predsim and glob on a narrow ResNet-32; cost-aware partitioning.

Part 1 (accuracy, a preset of the runner :mod:`benchmarks.accuracy`): a ResNet-32 (16 local
layers: stem + 15 residual blocks, the last with the classifier) of ``--width`` (0.25:
4 / 8 / 16 channels) on real MNIST digits (``mnist-10k``: 8000 training / 2000 test images of
the MNIST test split, 28x28, no resizing needed: the ResNet pools globally), trained
single-process on CPU with every rule of ``--rules``, same seed, Adam. Records the output's
test accuracy and every block's local (auxiliary-head) test accuracy, then checks the AugLocal
paper's ordering: is AugLocal closer to glob than DGL and InfoPro are?

Part 2 (partition): ResNet-32 with AugLocal (``rule.aux_depth = 4``), 2 stages, through the
CLI (``python -m pipelocal train --stages 2 --set pipeline.partition=[...]``): the block-count
split [8, 8], the split balanced on the MAC cost model (body + auxiliary nets,
:mod:`benchmarks.cost`) and the split ``pipelocal plan`` proposes from timing each
block's training step. Throughput = the run's ``throughput(samples/s)`` (training samples /
epoch time). The splits alternate, ``--partition-repeats`` times each.

Committed results:

* ``results/auglocal_resnet.json`` (partition only: a bare ``--rules`` skips the accuracy
  part)::

    python -m benchmarks auglocal_resnet --rules --partition-limit 1024 --partition-repeats 3

* ``results/auglocal_resnet_accuracy_authors.json`` (accuracy with the authors' defaults:
  AugLocal's top aux_depth + 1 blocks end to end, he-normal init for auglocal / dgl / infopro,
  InfoPro's strided head and un-normalised target; 2 epochs of 250 steps of 32 images, seeds 0
  and 1)::

    python -m benchmarks auglocal_resnet --epochs 2 --repeats 2 --batch-size 32 \
        --skip-partition --out benchmarks/results/auglocal_resnet_accuracy_authors.json

* ``results/auglocal_resnet_accuracy.json``: the same command before those defaults (an aux net
  on every hidden block, PyTorch's init with the output weight zeroed, InfoPro's stride-1 head
  and min-max target). The partition result above was measured before them too.

Quick smoke test (writes to /tmp):

    python -m benchmarks auglocal_resnet --epochs 1 --set data.train_limit=256 \
        --partition-limit 256 --partition-repeats 1 --out /tmp/auglocal_resnet.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy import accuracy_record, run_grid
from benchmarks.common import (
    MNIST_10K_DIR,
    REPO_ROOT,
    Provenance,
    add_common_args,
    markdown_table,
    read_metrics,
    read_run_config,
    require_mnist_10k,
    run_root,
    summarize,
    write_result,
)
from benchmarks.cost import block_costs
from pipelocal.config import load_config
from pipelocal.models import build_model
from pipelocal.pipeline.balance import balance_partition
from pipelocal.pipeline.partition import balanced_partition, stage_ranges
from pipelocal.rules import end_to_end_top

NAME = "auglocal_resnet"
# label -> rule overrides
RULES = {
    "auglocal-d2": ["rule.name=auglocal", "rule.aux_depth=2"],
    "auglocal-d4": ["rule.name=auglocal", "rule.aux_depth=4"],
    "dgl": ["rule.name=dgl"],
    "infopro": ["rule.name=infopro"],
    "predsim": ["rule.name=predsim"],
    "glob": ["rule.name=glob"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=float, default=0.25, help="model.width (default 0.25)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES),
                   help="rules of the accuracy part; none (a bare --rules) skips it")
    p.add_argument("--partition-limit", type=int, default=2048,
                   help="data.train_limit of the partition runs (default 2048)")
    p.add_argument("--partition-repeats", type=int, default=2)
    p.add_argument("--skip-partition", action="store_true")
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR))
    add_common_args(p, repeats=1)
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "model.name=resnet32", f"model.width={args.width}", "model.dropout=0.0",
        "data.name=mnist-10k", f"data.data_dir={args.data_dir!r}",
        f"data.batch_size={args.batch_size}", "optim.name=adam", f"optim.lr={args.lr}",
        "schedule.name=constant", f"run.epochs={args.epochs}", "run.device=cpu",
        "run.threads=1", "run.progress=false",
    ]


def cost_partition(args: argparse.Namespace) -> tuple[list[int], list[dict[str, Any]]]:
    cfg = load_config(None, [*base_overrides(args), *RULES["auglocal-d4"]])
    specs = build_model(cfg.model, (1, 28, 28), 10)
    costs = block_costs(cfg, specs, 10)
    table = [{"block": c.name, "body_macs": c.body_macs, "aux_macs": c.rule_macs}
             for c in costs]
    together = end_to_end_top(cfg.rule, len(specs))  # the top that learns end to end
    return balanced_partition([c.train_macs for c in costs], 2, together=together), table


def profiled_partition(args: argparse.Namespace) -> list[int]:
    """The split ``pipelocal plan`` proposes: each block's train step (body + aux net) timed
    on this CPU with one thread, as the stages will run it."""
    cfg = load_config(None, [*base_overrides(args), *RULES["auglocal-d4"], "pipeline.stages=2"])
    torch.set_num_threads(1)
    specs = build_model(cfg.model, (1, 28, 28), 10)
    return balance_partition(cfg, specs, 10, torch.device("cpu")).partition


def partition_run(args: argparse.Namespace, partition: list[int], root: Path, tag: str
                  ) -> dict[str, Any]:
    sets = [*base_overrides(args), *RULES["auglocal-d4"], "run.epochs=1",
            f"data.train_limit={args.partition_limit}", "pipeline.threads_per_stage=1",
            f"pipeline.partition=[{','.join(map(str, partition))}]",
            f"run.out_dir={str(root)!r}", f"run.name={tag}"]
    cmd = [sys.executable, "-m", "pipelocal", "train", "--stages", "2"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env,
                          cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rec = read_metrics(root / tag)[-1]
    assert read_run_config(root / tag)["pipeline"]["partition"] == partition
    return {
        "partition": partition,
        "throughput(samples/s)": rec["throughput(samples/s)"],
        "time/epoch(s)": rec["time/epoch(s)"],
        "stage_busy(s)": [rec[f"stage{k}/busy(s)"] for k in range(2)],
        "command": " ".join(cmd),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_mnist_10k(args.data_dir, NAME)
    prov = Provenance(NAME)
    part: dict[str, Any] = {}
    with run_root(args.runs_dir) as root:
        runs = run_grid(base_overrides(args), {k: RULES[k] for k in args.rules},
                        range(args.repeats), root=root, epochs=args.epochs,
                        overrides=args.overrides, record=accuracy_record)
        if not args.skip_partition:
            aware, table = cost_partition(args)
            splits = {"block_count": [8, 8], "cost_aware": aware,
                      "profiled": profiled_partition(args)}
            part = {"mac_table": table, "splits": splits, "runs": []}
            for rep in range(args.partition_repeats):
                for name, split in splits.items():
                    print(f"== partition {name} {split}, repeat {rep}", flush=True)
                    r = partition_run(args, split, root, f"part-{name}-{rep}")
                    part["runs"].append({"split": name, "repeat": rep, **r})
            macs = [3 * (t["body_macs"] + t["aux_macs"]) for t in table]
            for name, split in splits.items():
                tp = [r["throughput(samples/s)"] for r in part["runs"] if r["split"] == name]
                stage_macs = [sum(macs[i] for i in rng) for rng in stage_ranges(split)]
                part[name] = {"throughput(samples/s)": summarize(tp),
                              "stage_train_macs_per_sample": stage_macs}
            for name in ("cost_aware", "profiled"):
                part[f"speedup_{name}_over_block_count"] = (
                    part[name]["throughput(samples/s)"]["mean"]
                    / part["block_count"]["throughput(samples/s)"]["mean"])
    summary = {label: summarize([r["test_acc(%)"] for r in runs if r["rule"] == label])
               for label in args.rules}
    check: dict[str, Any] = {}
    if {"glob", "dgl", "infopro"} <= set(summary):
        gap = {k: summary["glob"]["mean"] - v["mean"] for k, v in summary.items()}
        check = {"gap_to_glob(pp)": gap}
        for k in ("auglocal-d2", "auglocal-d4"):
            if k in gap:
                check[f"{k}_closer_than_dgl_and_infopro"] = gap[k] < min(gap["dgl"],
                                                                         gap["infopro"])
    payload = {
        "settings": {"model": "resnet32", "width": args.width,
                     "channels": [max(1, round(c * args.width)) for c in (16, 32, 64)],
                     "dataset": "mnist-10k (8000 train / 2000 test of the MNIST test split), "
                                "28x28", "epochs": args.epochs, "batch_size": args.batch_size,
                     "optimizer": f"adam lr {args.lr}, constant", "rules": RULES,
                     "seeds": list(range(args.repeats)), "overrides": args.overrides,
                     "torch_threads": 1},
        "summary": summary, "check": check, "partition": part, "runs": runs,
    }
    path = write_result(prov, payload, args.out)
    rows = [[k, f"{v['mean']:.2f}", f"{check.get('gap_to_glob(pp)', {}).get(k, 0):.2f}"]
            for k, v in summary.items()]
    print(markdown_table(["rule", "test acc (%)", "gap to glob (pp)"], rows))
    if part:
        print(markdown_table(["split", "partition", "samples/s (mean)"], [
            [n, part["splits"][n], f"{part[n]['throughput(samples/s)']['mean']:.1f}"]
            for n in part["splits"]]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
