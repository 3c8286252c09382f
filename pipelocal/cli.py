"""``pipelocal``: train | eval | plan | plot | bench | config | models | rules | datasets | recipes.

    pipelocal train                                   # embedded digits set, pipelined if S > 1
    pipelocal train --config my.toml --set optim.lr=3e-4 --stages 4
    pipelocal train --resume runs/NAME                # continue from the latest checkpoint
    pipelocal train --stages 4 --dry-run              # check config, partition, stage shapes
    pipelocal train --stages 2 --micro-batches 4 --set rule.name=pred   # streamed in quarters
    pipelocal eval runs/NAME                          # test accuracy of a checkpoint
    pipelocal plan --config my.toml --stages 4        # profile blocks, propose a partition
    pipelocal plot runs/NAME                          # learning curves -> runs/NAME/curves.png
    torchrun --nproc-per-node 4 -m pipelocal train --config my.toml   # one rank per stage
    pipelocal bench --models mlp                      # the headline benchmark (source checkout)
    pipelocal train --launcher ray --stages 3         # one Ray actor per stage
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn

from pipelocal.config import Config, ConfigError, config_to_dict
from pipelocal.exits import EXIT_INTERRUPTED, EXIT_NONFINITE, exit_status, write_status

__all__ = ["EXIT_INTERRUPTED", "EXIT_NONFINITE", "main", "run"]


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    from pipelocal.config import load_config
    from pipelocal.recipes import recipe_path

    overrides = list(args.set or []) + (extra or [])
    return load_config(None if args.config is None else recipe_path(args.config), overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from pipelocal.checkpoint import read_manifest
    from pipelocal.launch import train
    from pipelocal.launch.preflight import resume_config
    from pipelocal.stop import install_stop_handlers

    install_stop_handlers()  # first Ctrl-C / SIGTERM: checkpoint at the current step, then stop
    t0 = time.perf_counter()
    if args.resume and args.overwrite:
        raise ConfigError(f"--resume {args.resume} continues a run and --overwrite replaces "
                          "one; pass one of them")
    if args.resume and not args.config:
        # Resume with the checkpoint's own config, then apply this command's overrides.
        cfg = resume_config(read_manifest(args.resume), list(args.set or []) + _train_flags(args))
    else:
        cfg = _config(args, _train_flags(args))
    if args.dry_run:
        return _dry_run(cfg, args.resume)
    result = train(cfg, resume=args.resume)
    if result is None:  # a torchrun rank other than 0
        return 0
    _print_result(result, wall_s=time.perf_counter() - t0)
    return EXIT_INTERRUPTED if result.get("stopped") == "interrupted" else 0


def _dry_run(cfg: Config, resume: str | None) -> int:
    """The checks `train` makes before any worker starts, then a dummy batch through the stages."""
    from pipelocal.launch.preflight import preflight
    from pipelocal.pipeline.partition import stage_ranges

    spec = preflight(cfg, resume, open_dir=False)
    specs, partition = spec.specs, list(spec.cfg.pipeline.partition)
    print(f"dry run OK: {spec.cfg.model.name} on {spec.cfg.data.name}, "
          f"{len(partition)} stage(s), partition {partition}"
          + (f", {spec.cfg.pipeline.replicas} replicas" if spec.cfg.pipeline.replicas > 1 else ""))
    for s, r in enumerate(stage_ranges(partition)):
        print(f"  stage {s}: {', '.join(specs[i].name for i in r)}  "
              f"in {list(specs[r.start].in_shape)} -> out {list(specs[r.stop - 1].wire_shape)}")
    return 0


def _train_flags(args: argparse.Namespace) -> list[str]:
    """--stages, --replicas, --micro-batches, --launcher and --overwrite as overrides (they win
    over --set, like any flag).

    ``--stages 1`` without ``--launcher`` runs in this process, whatever launcher the config
    or the resumed checkpoint names (a Ray run resumed on one stage starts no Ray), and without
    ``--replicas`` it runs one replica, whatever replicas they name.
    """
    flags = [f"pipeline.stages={args.stages}"] if args.stages else []
    flags += [f"pipeline.replicas={args.replicas}"] if args.replicas else []
    if args.stages == 1 and not args.replicas and not args.launcher:
        flags.append("pipeline.replicas=1")
    if args.stages == 1 and not args.launcher:
        flags.append("pipeline.launcher=spawn")
    if args.micro_batches is not None:
        flags.append(f"pipeline.micro_batches={args.micro_batches}")
    flags += ["run.resume=overwrite"] if args.overwrite else []
    return flags + ([f"pipeline.launcher={args.launcher}"] if args.launcher else [])


def _print_result(result: dict[str, Any], *, wall_s: float) -> None:
    if result.get("stopped") == "complete":
        print(f"the run is already complete at epoch {result['epoch']} (step {result['step']}); "
              "nothing to do (to train longer, start a new run with more run.epochs)")
    elif result.get("stopped"):
        print(f"stopped ({result['stopped']}) at step {result['step']}; "
              f"checkpoint: {result['checkpoint']}")
    if result.get("test/acc") is not None:
        print(f"final test accuracy: {100 * result['test/acc']:.2f}%  (best "
              f"{100 * result['test/best_acc']:.2f}% at epoch {result['test/best_epoch']})")
    training = (f" (training {result['time/total(s)']:.1f} s)" if "time/total(s)" in result
                else "")
    print(f"wall time: {wall_s:.1f} s{training}")
    print(f"run directory: {result['run_dir']}")


def cmd_eval(args: argparse.Namespace) -> int:
    from pipelocal.launch import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, list(args.set or []))
    print(json.dumps(result, indent=1))
    print(f"test accuracy: {100 * result['test/acc']:.2f}%")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from pipelocal.device import cpu_threads, place_stage, visible_gpus
    from pipelocal.launch.preflight import resolve
    from pipelocal.pipeline.balance import balance_partition

    if args.devices:
        return _plan_devices(args)
    cfg = _config(args, [f"pipeline.stages={args.stages}"] if args.stages else [])
    spec = resolve(cfg)
    cfg = spec.cfg
    gpus = visible_gpus(cfg)
    device = place_stage(stages=cfg.pipeline.stages, gpus_per_node=gpus, nodes=1, local_rank=0,
                         device=cfg.run.device)
    torch.set_num_threads(cpu_threads(cfg.pipeline.threads_per_stage, cfg.pipeline.stages))
    balance = balance_partition(cfg, spec.specs, spec.num_classes, device)
    print(f"{cfg.model.name} on {cfg.data.name}, batch {cfg.data.batch_size}, {device}, "
          f"{torch.get_num_threads()} thread(s) per stage; {spec.note}")
    print(balance.table())
    print(f"\nuse it: --set 'pipeline.partition={balance.partition}'")
    return 0


def _plan_devices(args: argparse.Namespace) -> int:
    """``plan --devices N``: every layout R x S <= N predicted from block costs profiled at
    each replica's rows, beside data-parallel backprop over N ranks."""
    import torch

    from pipelocal.device import cpu_threads, visible_gpus
    from pipelocal.launch.preflight import resolve
    from pipelocal.pipeline.layout import (
        Link,
        largest_slice,
        plan_layouts,
        predict_ddp,
        profile_costs,
    )
    from pipelocal.pipeline.partition import max_stages
    from pipelocal.rules import RULES, end_to_end_top

    n = args.devices
    cfg = _config(args, ["pipeline.stages=1", "pipeline.replicas=1"])
    spec = resolve(cfg)
    gpus = visible_gpus(cfg)
    if gpus and not args.link:
        raise ConfigError("plan --devices on GPUs needs the link between them: --link "
                          "p2p=<GB/s>,latency=<us>,allreduce=<GB/s> (e.g. from nccl-tests)")
    if gpus and n > gpus:
        raise ConfigError(f"plan --devices {n} but only {gpus} GPU(s) are visible here to "
                          f"profile on; use --devices <= {gpus} or a machine with more")
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    threads = cpu_threads(cfg.pipeline.threads_per_stage, n)  # each of N ranks' share
    torch.set_num_threads(threads)
    batch = cfg.data.batch_size
    if args.link:
        link = Link.parse(args.link)
    else:
        from pipelocal.launch.link_probe import measure_link

        link = measure_link(threads)
    costs = {rows: profile_costs(cfg, spec.specs, spec.num_classes, device, rows)
             for rows in {largest_slice(batch, r) for r in range(1, min(n, batch) + 1)}}
    rule = RULES.get(cfg.rule.name)
    top = range(0) if rule.is_global else end_to_end_top(cfg.rule, len(spec.specs))
    stages = 1 if rule.is_global else max_stages(len(spec.specs), top)
    concurrent = 0 if gpus else max(1, len(os.sched_getaffinity(0)) // threads)
    layouts = plan_layouts(costs, batch=batch, devices=n, link=link, max_stages=stages,
                           together=top, concurrent=concurrent,
                           channel_depth=cfg.pipeline.channel_depth)
    ddp = predict_ddp(costs[largest_slice(batch, n)], batch=batch, replicas=n, link=link,
                      concurrent=concurrent)
    print(f"{cfg.model.name} with {cfg.rule.name} on {cfg.data.name}, global batch {batch}, "
          f"{n} device(s) ({device.type}, {threads} thread(s) per rank); link: {link}"
          + ("" if args.link else " (measured here)"))
    print(f"{'layout':<10} {'partition':<22} {'samples/s':>10} {'MiB/device':>11} "
          f"{'vs DDP':>7}")
    for lay in [*layouts[:args.top], ddp]:
        label = lay.name() if lay is not ddp else f"DDP R={n}"
        print(f"{label:<10} {lay.partition!s:<22} {lay.samples_s:>10,.0f} "
              f"{lay.memory_bytes / 2**20:>11.1f} {lay.samples_s / ddp.samples_s:>6.2f}x")
    best = layouts[0]
    winner = (f"{best.name()} ({best.samples_s / ddp.samples_s:.2f}x DDP backprop)"
              if best.samples_s >= ddp.samples_s else
              f"data-parallel backprop (DDP R={n}); the best pipelocal layout, {best.name()}, "
              f"is {best.samples_s / ddp.samples_s:.2f}x it")
    print(f"\npredicted best: {winner}")
    print(f"use it: pipelocal train --replicas {best.replicas} --stages {best.stages} --set "
          f"'pipeline.partition={best.partition}'")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pipelocal.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.command == "models":
        from pipelocal.models import MODELS as registry
    elif args.command == "rules":
        from pipelocal.rules import RULES as registry
    else:
        from pipelocal.data import DATASETS as registry
    print("\n".join(registry.names()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the headline benchmark of a source checkout (``python -m benchmarks bench ...``)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise FileNotFoundError(f"pipelocal bench runs the benchmarks package of {root}, which "
                                "is not there; run it from a source checkout of pipelocal")
    # The checkout on the path, the caller's cwd kept (relative --out-dir paths stay theirs).
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, "-m", "benchmarks", "bench", *args.args],
                           env={**os.environ, "PYTHONPATH": path})


def cmd_config(args: argparse.Namespace) -> int:
    from pipelocal.config import to_toml

    cfg = _config(args)
    print(to_toml(cfg) if not args.json else json.dumps(config_to_dict(cfg), indent=1))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the paper recipes with their figures, or compare a run with one."""
    from pipelocal.recipes import compare_run, find_recipes, load_recipe

    if args.recipe and args.run:
        print(compare_run(load_recipe(args.recipe), args.run))
        return 0
    from pipelocal.recipes import RECIPES_DIR

    recipes = [load_recipe(args.recipe)] if args.recipe else find_recipes()
    for r in recipes:
        # A packaged recipe by its name (what --config takes too), another by its path.
        path = (r.path.relative_to(RECIPES_DIR).as_posix() if r.path.is_relative_to(RECIPES_DIR)
                else str(r.path))
        figures = "  ".join(f"{rule} {r.headline(rule)}%" for rule in r.rules)
        print(f"{r.title:<52} {figures}\n    {path}")
        for rule in r.rules if args.recipe else ():
            extra = "".join(f" --set {o}" for o in [f"rule.name={rule}",
                                                     *r.rule_overrides.get(rule, [])])
            print(f"    pipelocal train --config {path}{extra}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipelocal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML config file, or a recipe's name as `pipelocal "
                        "recipes` lists it (CLI --set wins over it)")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")

    from pipelocal.config import config_help

    p.add_argument("--version", action="version", version=f"pipelocal {_version()}")
    t = sub.add_parser("train", help="train a model (pipelined when pipeline.stages > 1)",
                       epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(t)
    t.add_argument("--stages", type=int,
                   help="pipeline stages (= pipeline.stages); 1 runs in this process unless "
                        "--launcher ray is given too")
    t.add_argument("--micro-batches", type=int, metavar="M",
                   help="train each batch in M micro-batches, each streamed to the next stage "
                        "as soon as it is done (= pipeline.micro_batches)")
    t.add_argument("--replicas", type=int,
                   help="data-parallel copies of the pipeline (= pipeline.replicas): "
                        "replicas x stages workers")
    t.add_argument("--resume", help="run directory or checkpoint to continue from")
    t.add_argument("--overwrite", action="store_true",
                   help="run.name names a directory holding an earlier run: delete it and "
                        "start afresh (= run.resume = overwrite; without it such a run is "
                        "refused)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate config, partition and stage shapes, then exit without training")
    t.add_argument("--launcher", choices=("spawn", "ray"),
                   help="where the stages run: processes started here (spawn) or Ray actors "
                        "(ray); = pipeline.launcher")
    t.add_argument("--backend", choices=("spawn", "ray"), dest="launcher",
                   help="deprecated alias of --launcher (the process-group backend, gloo or "
                        "NCCL, follows the device)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test accuracy of a checkpoint (single process)")
    e.add_argument("checkpoint", help="run directory or checkpoint folder")
    e.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="profile blocks and propose a balanced partition")
    with_config(pl)
    pl.add_argument("--stages", type=int, help="number of stages to plan for")
    pl.add_argument("--devices", type=int, default=0,
                    help="plan replicas x stages for N devices: every layout R x S <= N "
                         "predicted, beside data-parallel backprop")
    pl.add_argument("--link", default="",
                    help="with --devices: the interconnect, p2p=<n>GB/s,latency=<n>us,"
                         "allreduce=<n>GB/s (default: measured here over gloo)")
    pl.add_argument("--top", type=int, default=5, help="with --devices: layouts shown")
    pl.set_defaults(func=cmd_plan)

    # '+' prefix: every argument, --options included, goes on to `python -m benchmarks bench`.
    b = sub.add_parser("bench", prefix_chars="+", add_help=False,
                       help="headline benchmark (python -m benchmarks bench; bench --help)")
    b.add_argument("args", nargs="*")
    b.set_defaults(func=cmd_bench)

    pt = sub.add_parser("plot", help="draw a run's learning curves and stage utilisation (PNG)")
    pt.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    pt.add_argument("--out", help="PNG file to write (default: RUN_DIR/curves.png)")
    pt.set_defaults(func=cmd_plot)

    c = sub.add_parser("config", help="print the resolved config")
    with_config(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config)

    r = sub.add_parser("recipes", help="the papers' table rows as configs, with their figures")
    r.add_argument("recipe", nargs="?",
                   help="one recipe: its name as `pipelocal recipes` lists it, or a path")
    r.add_argument("--run", help="run directory to compare with the recipe's figures")
    r.set_defaults(func=cmd_recipes)

    for name in ("models", "rules", "datasets"):
        sub.add_parser(name, help=f"list the registered {name}").set_defaults(func=cmd_list)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pipelocal")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def run() -> NoReturn:
    """The entry point of the ``pipelocal`` command and ``python -m pipelocal``: :func:`main`
    in a process of its own, which a Ctrl-C pressed after the outcome no longer changes
    (:func:`pipelocal.stop.end_process`)."""
    from pipelocal.stop import end_process

    end_process(main(exit_on_signal=True))


def main(argv: list[str] | None = None, *, exit_on_signal: bool = False) -> int:
    """Run one command; the exit status is one of :mod:`pipelocal.exits` (also written to
    ``PIPELOCAL_STATUS_FILE`` when set, for launch/torchrun.sh). ``exit_on_signal``: once the
    status is known, a SIGINT / SIGTERM exits the process with it at once (the process ends
    with this command; a second Ctrl-C while it reports and shuts down is no crash)."""
    from pipelocal.stop import exit_on_stop_signals

    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
    except BaseException as exc:
        known = exit_status(exc)
        if known is None:
            raise
        code, line = known
        print(line, file=sys.stderr)
    if exit_on_signal:
        exit_on_stop_signals(code)
    if args.func is cmd_train and _speaks_for_the_job():
        write_status(code)
    return code


def _speaks_for_the_job() -> bool:
    """Rank 0 speaks for a torchrun job (and any process outside one)."""
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(run())
