"""Real-data check: VGG8B trained by local learning (predsim) vs end-to-end backprop (glob).

On the real MNIST test split (``../shared/data/mnist-10k`` from the repository root; pipelocal
cuts it into 8000 training / 2000 test images with a fixed permutation), a reduced-width VGG8B
is trained with rule ``predsim`` and with rule ``glob``, same seeds, single process on CPU. For
every run it records the final test error of the output, each hidden block's local test error
(its predsim classifier), the training time and the training throughput; then it checks that
predsim's mean test error is within ``--tolerance`` percentage points of glob's. A preset of
the accuracy runner (:mod:`benchmarks.accuracy`).

The committed result (``--repeats 3`` runs three seeds):

    python -m benchmarks mnist_realdata --epochs 8

Why 8 epochs (the default): mnist-10k has only 63 batches per epoch, and after 3 epochs both
rules are still far from converged, predsim (whose deeper blocks learn from inputs that are
still changing) much further than glob, so the tolerance check fails on training time alone.

Quick smoke test (about a minute; writes to /tmp, not to benchmarks/results):

    python -m benchmarks mnist_realdata --epochs 1 --repeats 1 --width 0.125 \
        --set data.train_limit=1000 --out /tmp/mnist_realdata.json

Result: ``benchmarks/results/mnist_realdata.json`` (``--out`` to change), then a table on
stdout. Exit status 1 if predsim is not within the tolerance of glob (the JSON is still written).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.accuracy import run_rules
from benchmarks.common import (
    MNIST_10K_DIR,
    add_common_args,
    fmt_stat,
    markdown_table,
    summarize,
    write_result,
)

NAME = "mnist_realdata"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--width",
        type=float,
        default=0.25,
        help="model.width: VGG8B channel multiplier (default 0.25)",
    )
    p.add_argument("--dropout", type=float, default=0.1, help="model.dropout (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="run.threads: torch threads (default 0 = torch's default)",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        default=["predsim", "glob"],
        help="rules to train (the tolerance check needs predsim and glob)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=3.0,
        help="max. percentage points by which predsim's mean test error may exceed "
        "glob's (default 3.0)",
    )
    p.add_argument(
        "--data-dir",
        default=str(MNIST_10K_DIR),
        help=f"folder holding the MNIST test-split IDX files (default {MNIST_10K_DIR})",
    )
    add_common_args(p, repeats=1)
    return p.parse_args(argv)


def recipe(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides shared by every rule and seed."""
    return [
        "model.name=vgg8b",
        f"model.width={args.width}",
        f"model.dropout={args.dropout}",
        "data.name=mnist-10k",
        f"data.data_dir={args.data_dir!r}",
        f"data.batch_size={args.batch_size}",
        "optim.name=adam",
        f"optim.lr={args.lr}",
        "run.device=cpu",
        f"run.threads={args.threads}",
        "run.progress=false",
    ]


def local_cell(errs: dict[str, float | None]) -> str:
    return " ".join(f"{k}:{v:.1f}" for k, v in errs.items() if v is not None) or "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prov, runs = run_rules(NAME, recipe(args), args)
    import torch

    per_rule = {
        rule: {
            "test_err(%)": summarize([r["test_err(%)"] for r in runs if r["rule"] == rule]),
            "train_time(s)": summarize([r["train_time(s)"] for r in runs if r["rule"] == rule]),
            "throughput(samples/s)": summarize(
                [r["throughput(samples/s)"] for r in runs if r["rule"] == rule]
            ),
        }
        for rule in args.rules
    }
    check: dict[str, Any] = {"tolerance(pp)": args.tolerance, "within_tolerance": None}
    if "predsim" in per_rule and "glob" in per_rule:
        gap = per_rule["predsim"]["test_err(%)"]["mean"] - per_rule["glob"]["test_err(%)"]["mean"]
        check.update({"gap_predsim_minus_glob(pp)": gap, "within_tolerance": gap <= args.tolerance})
    payload = {
        "settings": {
            "model": "vgg8b",
            "width": args.width,
            "dropout": args.dropout,
            "dataset": "mnist-10k (8000 train / 2000 test of the MNIST test split)",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "rules": args.rules,
            "repeats": args.repeats,
            "seeds": list(range(args.repeats)),
            "torch_threads": torch.get_num_threads(),
            "overrides": args.overrides,
        },
        "summary": per_rule,
        "check": check,
        "runs": runs,
    }
    path = write_result(prov, payload, args.out)

    print()
    print(
        markdown_table(
            ["rule", "seed", "test err %", "local test err % per block", "train s", "samples/s"],
            [
                [
                    r["rule"],
                    r["seed"],
                    f"{r['test_err(%)']:.2f}",
                    local_cell(r["local_test_err(%)"]),
                    f"{r['train_time(s)']:.1f}",
                    f"{r['throughput(samples/s)']:.0f}",
                ]
                for r in runs
            ],
        )
    )
    print()
    print(
        markdown_table(
            ["rule", "test err % (mean ± std (min-max, n))", "samples/s"],
            [
                [rule, fmt_stat(s["test_err(%)"]), fmt_stat(s["throughput(samples/s)"], 0)]
                for rule, s in per_rule.items()
            ],
        )
    )
    if check["within_tolerance"] is not None:
        verdict = "PASS" if check["within_tolerance"] else "FAIL"
        print(
            f"\n{verdict}: predsim - glob = {check['gap_predsim_minus_glob(pp)']:+.2f} pp "
            f"(tolerance {args.tolerance} pp)"
        )
    print(f"result: {path}")
    return 0 if check["within_tolerance"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
