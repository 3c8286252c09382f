"""Time to accuracy: which rule reaches a given test accuracy first, on S devices.

For the MLP and VGG8B (x0.25) presets of the headline benchmark on mnist-10k, seeds 0 and 1,
each run a fresh ``python -m pipelocal train`` process (one after another, never two at once;
for each seed, for each model, every configuration back to back):

    glob (end-to-end backprop)         1 device   (--stages 1)
    pred, predsim, sym (local rules)   1 device and S = 2 stages (one split per model,
                                       balanced on the last local rule's per-block times)

every one evaluated on the test split after each epoch, one torch thread per device. The time
axis is *training* time: the sum of the metrics records' ``time/epoch(s)``. The trainer
(pipelocal/trainer.py, ``Trainer.fit``) starts that clock at the epoch's first batch and stops
it when ``pipe.end_epoch`` returns, once every stage has finished the epoch's last batch (the
pipeline drained); it evaluates and checkpoints only after that, so neither counts.

Figures, per model: glob's best accuracy (median over seeds of each seed's best) sets two
targets, best - 1 pt and best - 0.5 pt; per rule and S the training seconds to first reach
each target (per seed, median [min-max]; "not reached" when a seed never does); the accuracy
after equal training time (the last evaluation at or before the shortest configuration's total
training time); and, predicted (scaling model), the time to each target at S = 4 and 8: the
epochs S = 2 needed x the epoch time that ``scaling.predict_pipelocal`` gives for S from the
per-block costs profiled in this run and the gloo link measured here as the headline
measures it (``torchpipe.transport`` between the two ranks of the S = 2 split: a ping-pong of
stage 0's output message and of a 4-byte tensor; ``analysis.link_of``). A local rule computes
the same thing on any number of stages (the pipelined run equals the sequential one), so the
epochs needed do not depend on S; only the epoch time does. S larger than the model's block
count is impossible (one block per stage at most).

Writes ``tta.json``, ``tta.md`` to ``--out-dir`` (default benchmarks/results) and ``tta.png``
(to docs/img/ for the default out-dir). The full run (about 40 minutes on a 2-core CPU; the
estimate is printed first):

    python -m benchmarks tta

A smoke test (tiny models, 2 epochs of a few batches; a minute or two):

    python -m benchmarks tta --quick --models mlp --seeds 0 --rules pred --out-dir /tmp/tta
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MNIST_10K_DIR,
    RESULTS_DIR,
    Provenance,
    markdown_table,
    require_mnist_10k,
    write_result,
)
from benchmarks.headline.analysis import cost_table, link_of, stat, time_to_accuracy
from benchmarks.headline.bench import Runner, _split, plot_path, preset_for
from benchmarks.headline.report import save_figure
from benchmarks.headline.scaling import BlockCost, Link, predict_backprop, predict_pipelocal

__all__ = ["BUDGETS", "Budget", "analyse_model", "curve", "equal_time", "main", "predictions",
           "same_accuracy", "targets", "time_to"]

PREDICTED = "predicted (scaling model)"
MARGINS = {"best-1pt": 0.01, "best-0.5pt": 0.005}
"""Target name -> accuracy below glob's best (fraction: 0.01 = 1 percentage point)."""
TRAIN_SAMPLES, TEST_SAMPLES = 8000, 2000  # mnist-10k's fixed split
_START_S = 6.0
"""Rough seconds a run spends outside its epochs (python, torch, data, workers), for the
estimate only."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """How long each configuration of one model trains."""

    epochs: int
    batches: int
    """Batches per epoch (``data.train_limit`` = this x batch size); 0 = the whole split."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batches < 0:
            raise ValueError(f"budget: epochs {self.epochs} must be >= 1 and batches "
                             f"{self.batches} >= 0 (0 = the whole training split)")


BUDGETS = {
    "mlp": Budget(epochs=6, batches=0),  # 6 x 8000 samples
    "vgg8b": Budget(epochs=6, batches=31),  # 6 x 3968 samples, about 3 passes over the split
}
QUICK = Budget(epochs=2, batches=8)


# --------------------------------------------------------------------------- analysis


def curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluation: epoch, cumulative ``train_time(s)`` (sum of time/epoch(s)), test/acc."""
    return time_to_accuracy({"run": records}, margin=0.0)["curves"]["run"]


def targets(glob: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """glob's best (median over seeds of each seed's best test/acc) and the targets below it."""
    best = stat([max(p["test/acc"] for p in pts) for pts in glob.values()])["median"]
    return {"glob_best": best, **{name: best - m for name, m in MARGINS.items()}}


def time_to(curves: dict[str, list[dict[str, Any]]], target: float) -> dict[str, Any]:
    """Per seed, the first evaluation at or above ``target`` (None if none); the median
    [min-max] of the seconds over the seeds that reached it."""
    first = {seed: next(({"train_time(s)": p["train_time(s)"], "epoch": p["epoch"]}
                         for p in pts if p["test/acc"] >= target), None)
             for seed, pts in curves.items()}
    secs = [f["train_time(s)"] for f in first.values() if f]
    return {"per_seed": first, "reached": len(secs), "n": len(first),
            "train_time(s)": stat(secs) if secs else None}


def equal_time(curves: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Each configuration's accuracy at the longest training time every run reached (the
    shortest run's total): its last evaluation at or before it, per seed and the median."""
    horizon = min(pts[-1]["train_time(s)"] for runs in curves.values() for pts in runs.values())
    acc = {}
    for key, runs in curves.items():
        per_seed = {seed: next((p["test/acc"] for p in reversed(pts)
                                if p["train_time(s)"] <= horizon), None)
                    for seed, pts in runs.items()}
        known = [a for a in per_seed.values() if a is not None]
        acc[key] = {"per_seed": per_seed, "median": stat(known)["median"] if known else None}
    return {"horizon(s)": horizon, "test/acc": acc}


def same_accuracy(curves: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, bool]:
    """Per rule run at several S: did every S give the same test accuracy after every epoch,
    seed by seed? (A pipelined run reproduces the sequential one; the predictions rest on it.)"""
    by_rule: dict[str, list[dict[str, list[float]]]] = {}
    for key, runs in curves.items():
        by_rule.setdefault(key.split(" S=")[0], []).append(
            {seed: [p["test/acc"] for p in pts] for seed, pts in runs.items()})
    return {rule: all(r == accs[0] for r in accs) for rule, accs in by_rule.items()
            if len(accs) > 1}


def _epoch_s(table: list[BlockCost], stages: int, *, batch_size: int, batches: int,
             link: Link, channel_depth: int, partition: list[int] | None = None) -> float:
    """The scaling model's seconds per epoch of pipelocal with ``stages`` stages."""
    p = predict_pipelocal(table, stages, batch_size=batch_size, batches=batches, link=link,
                          channel_depth=channel_depth, partition=partition)
    return batches * batch_size / p["throughput(samples/s)"]


def predictions(curves: dict[str, dict[str, list[dict[str, Any]]]], goal: dict[str, float],
                tables: dict[str, list[BlockCost]], *, stages: tuple[int, ...], batch_size: int,
                batches: int, link: Link, channel_depth: int) -> list[dict[str, Any]]:
    """Time to each target at each S in ``stages``, predicted from S = 2: the epochs S = 2
    needed (median over seeds; every seed must have reached it) x the model's epoch time."""
    rows = []
    for rule, table in tables.items():
        if f"{rule} S=2" not in curves:
            continue
        for name in MARGINS:
            reach = time_to(curves[f"{rule} S=2"], goal[name])
            for s in stages:
                row: dict[str, Any] = {"rule": rule, "S": s, "target": name, "kind": PREDICTED}
                if s > len(table):
                    row["impossible"] = f"S={s} > {len(table)} blocks (one block per stage " \
                                        "at most)"
                elif reach["reached"] < reach["n"]:
                    row["not_reached"] = f"S=2 reached it in {reach['reached']} of " \
                                         f"{reach['n']} seeds"
                else:
                    epochs = stat([f["epoch"] for f in reach["per_seed"].values()])["median"]
                    epoch = _epoch_s(table, s, batch_size=batch_size, batches=batches,
                                     link=link, channel_depth=channel_depth)
                    row |= {"epochs_at_S2": epochs, "epoch(s)": epoch,
                            "train_time(s)": epochs * epoch}
                rows.append(row)
    return rows


def _validation(raw: dict[str, Any], tables: dict[str, list[BlockCost]],
                link: Link) -> list[dict[str, Any]]:
    """The scaling model's epoch time beside the measured one (median over epochs and seeds)
    for every measured local-rule configuration: how far to trust the predictions."""
    rows = []
    for key, runs in raw["runs"].items():
        rule, s = key.split(" S=")
        if rule not in tables:
            continue
        part = raw["partitions"].get(s, [len(tables[rule])])
        pred = _epoch_s(tables[rule], int(s), batch_size=raw["batch_size"],
                        batches=raw["batches_per_epoch"], link=link,
                        channel_depth=raw["channel_depth"], partition=part)
        meas = stat([r["time/epoch(s)"] for run in runs.values() for r in run["records"]])
        rows.append({"config": key, "kind": PREDICTED, "predicted_epoch(s)": pred,
                     "measured_epoch(s)": meas["median"], "error": pred / meas["median"] - 1})
    return rows


def analyse_model(raw: dict[str, Any]) -> dict[str, Any]:
    link = link_of(raw["transport"])
    curves = {key: {seed: curve(run["records"]) for seed, run in runs.items()}
              for key, runs in raw["runs"].items()}
    goal = targets(curves["glob S=1"])
    tables = _tables(raw["plan_profile"])
    return {
        "targets": goal,
        "time_to_target": {key: {name: time_to(c, goal[name]) for name in MARGINS}
                           for key, c in curves.items()},
        "equal_time": equal_time(curves),
        "same_accuracy_every_S": same_accuracy(curves),
        "predictions": predictions(curves, goal, tables, stages=(4, 8),
                                   batch_size=raw["batch_size"],
                                   batches=raw["batches_per_epoch"], link=link,
                                   channel_depth=raw["channel_depth"]),
        "validation": _validation(raw, tables, link),
        "link": {"latency(s)": link.latency_s, "bytes/s": link.bytes_per_s},
        "curves": curves,
    }


def _tables(plan: dict[str, Any]) -> dict[str, list[BlockCost]]:
    """Per local rule, the cost table of a one-block-per-stage profile (``_split``'s)."""
    one = {"repeats": [{"profile": plan}], "plan_profile": plan}  # cost_table's input form
    return {rule: cost_table(one, rule) for rule in plan["rules"]}


# --------------------------------------------------------------------------- running


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,vgg8b", help=f"of {', '.join(BUDGETS)}")
    p.add_argument("--seeds", default="0,1", help="run.seed values")
    p.add_argument("--rules", default="pred,sym,predsim",
                   help="local rules (glob, the reference, always runs, on 1 device); the "
                        "S > 1 split is balanced on the last one's block times")
    p.add_argument("--stages", default="1,2", help="S values for the local rules")
    p.add_argument("--epochs", type=int, default=0, help="override every model's epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads-per-stage", type=int, default=1,
                   help="torch threads per device (default 1)")
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR), help="mnist-10k folder")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny models, {QUICK.epochs} epochs of {QUICK.batches} batches")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--note", default="", help="free text stored in the JSON (machine state)")
    p.add_argument("--runs-dir", default=None, help="keep the run dirs here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra config override (repeatable)")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in BUDGETS:
            p.error(f"model {name!r} has no budget; available: {', '.join(BUDGETS)}")
    if "glob" in args.rules.split(","):
        p.error("--rules lists the local rules; glob, the reference, always runs")
    return args


def _log(msg: str) -> None:
    print(f"[tta] {msg}", flush=True)


def budget_for(args: argparse.Namespace, model: str) -> Budget:
    b = QUICK if args.quick else BUDGETS[model]
    return Budget(epochs=args.epochs or b.epochs, batches=b.batches)


def configs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(rule, S) in run order: glob on one device, then each local rule at each S."""
    stages = [int(s) for s in args.stages.split(",")]
    return [("glob", 1), *((rule, s) for rule in args.rules.split(",") for s in stages)]


@dataclass(frozen=True, kw_only=True)
class _Model:
    """One model's runner, split and measured costs (set up before any run)."""

    runner: Runner
    budget: Budget
    plan: dict[str, Any]
    partitions: dict[str, list[int]]
    batches: int
    """Batches per epoch."""
    transport: dict[str, Any]
    """``torchpipe.transport``'s figures between the two ranks of the first S > 1 split."""


def setup(args: argparse.Namespace, model: str, root: Path) -> _Model:
    """The block profile, one split per S > 1 (``_split``: balanced on measured times) and the
    link between the first split's two ranks."""
    from benchmarks.headline.torchpipe import run_torchpipe

    local = args.rules.split(",")
    multi = sorted({s for _, s in configs(args) if s > 1}) or [2]  # the profile at least
    plan, partitions = {}, {}
    for s in multi:
        ns = argparse.Namespace(**{**vars(args), "stages": s})  # Runner's and _split's S
        runner = Runner(ns, preset_for(model, args.quick), root)
        plan, partitions[str(s)] = _split(runner, model, local, glob=True)
    _log(f"{model}: the gloo link between two ranks (the headline's transport test)")
    ranks = run_torchpipe(runner.config("glob"), partitions[str(multi[0])], [], warmup=0,
                          steps=0, threads=runner.threads, transport_rounds=20)
    budget = budget_for(args, model)
    samples = budget.batches * args.batch_size or TRAIN_SAMPLES
    return _Model(runner=runner, budget=budget, plan=plan, partitions=partitions,
                  batches=-(-samples // args.batch_size), transport=ranks[0]["transport"])


def estimate(args: argparse.Namespace, models: dict[str, _Model]) -> float:
    """Seconds the runs should take: epochs from the scaling model, evaluation (a forward
    pass: ~1/3 of a training step per batch) and start-up roughly."""
    total = 0.0
    for m in models.values():
        tables, b, link = _tables(m.plan), args.batch_size, link_of(m.transport)
        rule0 = next(iter(tables))
        for rule, s in configs(args):
            if rule == "glob":
                epoch = m.batches * b / predict_backprop(tables[rule0], b)[
                    "throughput(samples/s)"]
            else:
                epoch = _epoch_s(tables[rule], s, batch_size=b, batches=m.batches, link=link,
                                 channel_depth=m.runner.config(rule).pipeline.channel_depth,
                                 partition=m.partitions.get(str(s), [len(tables[rule])]))
            step = epoch / m.batches
            total += m.budget.epochs * (epoch + TEST_SAMPLES / b * step / 3) + _START_S
    return total * len(args.seeds.split(","))


def train_one(m: _Model, rule: str, s: int, seed: int, name: str) -> dict[str, Any]:
    extra = (f"run.seed={seed}",)
    if s == 1:
        return m.runner.single_cli(rule, name, m.budget.epochs, m.budget.batches, extra)
    return m.runner.pipelocal(rule, name, m.budget.epochs, m.budget.batches,
                              m.partitions[str(s)], extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_mnist_10k(args.data_dir, "tta")
    prov = Provenance("tta")
    names, seeds, todo = args.models.split(","), args.seeds.split(","), configs(args)
    with tempfile.TemporaryDirectory(prefix="pipelocal-tta-") as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        models = {name: setup(args, name, root) for name in names}
        est = estimate(args, models)
        n_runs = len(seeds) * len(names) * len(todo)
        _log(f"{n_runs} runs ({len(seeds)} seeds x {len(names)} models x {len(todo)} "
             f"configurations); estimate {est / 60:.1f} min (epochs from the block profile, "
             "evaluation and start-up roughly)")
        raw = {name: _raw(args, m) for name, m in models.items()}
        i, path = 0, Path()
        for k, seed in enumerate(seeds):
            for name, m in models.items():
                for rule, s in todo:
                    i += 1
                    t0 = time.perf_counter()
                    run = train_one(m, rule, s, int(seed), f"{name}-{rule}-s{s}-seed{seed}")
                    raw[name]["runs"].setdefault(f"{rule} S={s}", {})[seed] = run
                    best = max(r["test/acc"] for r in run["records"])
                    _log(f"run {i}/{n_runs}: {name} {rule} S={s} seed {seed}: "
                         f"{time.perf_counter() - t0:.0f} s, best test/acc {best:.4f}")
            # Written after every seed, so that a stopped run keeps what it measured.
            path = write_outputs(args, prov, raw, complete=k == len(seeds) - 1)
    _log(f"wrote {path}, tta.md beside it and {plot_path(Path(args.out_dir), 'tta')}")
    return 0


def _raw(args: argparse.Namespace, m: _Model) -> dict[str, Any]:
    return {"label": m.runner.preset.label, "overrides": m.runner.base,
            "budget": asdict(m.budget), "batch_size": args.batch_size,
            "batches_per_epoch": m.batches, "threads_per_device": m.runner.threads,
            "partitions": m.partitions, "transport": m.transport,
            "split_rule": args.rules.split(",")[-1],
            "channel_depth": m.runner.config("glob").pipeline.channel_depth,
            "plan_profile": m.plan, "runs": {}}


# --------------------------------------------------------------------------- outputs


def write_outputs(args: argparse.Namespace, prov: Provenance, raw: dict[str, Any], *,
                  complete: bool) -> Path:
    out_dir = Path(args.out_dir)
    models = {name: {"raw": r, **analyse_model(r)} for name, r in raw.items()}
    payload = {"complete": complete, "machine_note": args.note, "settings": dict(vars(args)),
               "time_axis": "training seconds: the sum of the metrics "
               "records' time/epoch(s), which excludes evaluation and checkpointing",
               "models": models}
    path = write_result(prov, payload, out_dir / "tta.json")
    result = json.loads(path.read_text())
    text = markdown(result)
    (out_dir / "tta.md").write_text(text)
    plot(result, plot_path(out_dir, "tta"))
    print(text, flush=True)
    return path


def _sec(x: float) -> str:
    return f"{x:.{0 if x >= 100 else 1 if x >= 10 else 2}f}"


def _secs(t: dict[str, Any]) -> str:
    s = t["train_time(s)"]
    if s is None:
        return f"not reached (0/{t['n']})"
    text = f"{_sec(s['median'])} [{_sec(s['min'])}-{_sec(s['max'])}]"
    return text + (f" ({t['reached']}/{t['n']} seeds)" if t["reached"] < t["n"] else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = ["# Time to accuracy, mnist-10k", "",
             f"`{result['command']}`; {result['started']}; {hw['cpu_model']}, "
             f"{hw['cpu_cores_usable']} cores; torch {result['versions']['torch']}; git "
             f"{str(result['git']['commit'])[:10]}{' (dirty)' if result['git']['dirty'] else ''}"
             f"; load average before/after {result['load_avg_1_5_15']['before']} / "
             f"{result['load_avg_1_5_15']['after']}"
             + (f"; {result['machine_note']}" if result["machine_note"] else "") + ".", "",
             "Time: training seconds (sum of time/epoch(s); evaluation excluded), median "
             "[min-max] over the seeds that reached the target (k/n where not all did)."]
    for m in result["models"].values():
        raw, goal, eq, link = m["raw"], m["targets"], m["equal_time"], m["link"]
        b = raw["budget"]
        split = ", ".join(f"S={s}: {p}" for s, p in raw["partitions"].items())
        lines += ["", f"## {raw['label']}", "",
                  f"{b['epochs']} epochs of {raw['batches_per_epoch']} batches of "
                  f"{raw['batch_size']}; split {split} (balanced on "
                  f"{raw['split_rule']}'s block times); glob's best {_pct(goal['glob_best'])}%"
                  f", targets {_pct(goal['best-1pt'])}% and {_pct(goal['best-0.5pt'])}%.", ""]
        rows = [[key, *(_secs(m["time_to_target"][key][name]) for name in MARGINS),
                 _pct(eq["test/acc"][key]["median"])] for key in m["time_to_target"]]
        lines.append(markdown_table(
            ["rule, S", "time to best-1 pt (s)", "time to best-0.5 pt (s)",
             f"test acc % at {_sec(eq['horizon(s)'])} s"], rows))
        same = m["same_accuracy_every_S"]
        lines += ["", "Same test accuracy after every epoch at every S, every seed: " + (
            ", ".join(f"{r} {'yes' if ok else 'NO'}" for r, ok in same.items()) or "-") + "."]
        lines += ["", f"{PREDICTED.capitalize()}: time to target at S devices = epochs S=2 "
                  f"needed x the model's epoch time (link {link['latency(s)'] * 1e6:.0f} us, "
                  f"{link['bytes/s'] / 1e9:.2f} GB/s).", ""]
        lines.append(markdown_table(
            ["rule", "S", "target", "epochs S=2 needed", "epoch (s), predicted",
             "time to target (s), predicted"],
            [[r["rule"], r["S"], r["target"], *(
                [r.get("impossible") or r.get("not_reached"), "-", "-"] if "epoch(s)" not in r
                else [f"{r['epochs_at_S2']:g}", _sec(r["epoch(s)"]),
                      _sec(r["train_time(s)"])])] for r in m["predictions"]]))
        lines += ["", "The model against the measured epoch times:", ""]
        lines.append(markdown_table(
            ["config", "epoch (s), predicted", "epoch (s), measured", "error"],
            [[v["config"], _sec(v["predicted_epoch(s)"]), _sec(v["measured_epoch(s)"]),
              f"{100 * v['error']:+.0f}%"] for v in m["validation"]]))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, m in zip(axes[0], models.values()):
        colors: dict[str, Any] = {}
        for key, runs in m["curves"].items():
            rule, s = key.split(" S=")
            for j, pts in enumerate(runs.values()):
                line = ax.plot([p["train_time(s)"] for p in pts],
                               [100 * p["test/acc"] for p in pts], marker=".", lw=1,
                               ls="-" if s == "1" else "--", color=colors.get(rule),
                               label=key if j == 0 else None)[0]
                colors.setdefault(rule, line.get_color())
        for name in MARGINS:
            ax.axhline(100 * m["targets"][name], ls=":", c="grey", lw=1)
        ax.set(xlabel="training time (s; evaluation excluded)", ylabel="test accuracy (%)",
               title=f"{m['raw']['label']}: one line per seed (dotted: targets)")
        ax.legend(fontsize=8)
    save_figure(fig, result, "time to accuracy, mnist-10k", path)


if __name__ == "__main__":
    sys.exit(main())
