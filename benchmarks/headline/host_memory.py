"""Host memory: a CPU training step with glibc's malloc defaults against pipelocal's settings.

pipelocal starts its processes with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
set (``pipelocal/hostmem.py``), so that a step reuses the memory the step before it freed
instead of handing it back to the kernel and faulting it in again. This measures what that is
worth: for each model of the headline (its preset, mnist-10k, batch 128, one thread) and each
rule, the single-device peer (``peers.py single``: W warm-up steps, then N timed steps of the
whole model in one engine, in a fresh process) started with the defaults and with the
settings, interleaved within each repeat; throughput and minor page faults per step.

    python -m benchmarks host_memory                    # the committed result
    python -m benchmarks host_memory --quick --models mlp --repeats 1 --out-dir /tmp/hm

Writes ``host_memory.json`` and ``host_memory.md`` to ``--out-dir`` (benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
from benchmarks.headline.analysis import stat
from benchmarks.headline.bench import PRESETS, Runner, preset_for
from benchmarks.headline.bench import parse_args as bench_args
from pipelocal.hostmem import HOST_MALLOC_ENV

__all__ = ["main", "summary"]

SETTINGS = ("glibc defaults", "pipelocal's settings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,vgg8b", help=f"of {', '.join(PRESETS)}")
    p.add_argument("--rules", default="glob,pred")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=str(MNIST_10K_DIR))
    p.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    p.add_argument("--note", default="")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def _env(runner: Runner, kept: bool) -> dict[str, str]:
    base = {k: v for k, v in runner.env.items() if k not in HOST_MALLOC_ENV}
    return {**base, **HOST_MALLOC_ENV} if kept else base


def summary(reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per setting: throughput and faults per step over the repeats; the ratio of throughputs
    (settings / defaults) within each repeat."""
    out: dict[str, Any] = {
        name: {"throughput(samples/s)": stat([r[name]["throughput(samples/s)"] for r in reps]),
               "minor_faults/step": stat([r[name]["minor_faults/step"] for r in reps])}
        for name in SETTINGS}
    out["speedup"] = stat([r[SETTINGS[1]]["throughput(samples/s)"]
                           / r[SETTINGS[0]]["throughput(samples/s)"] for r in reps])
    return out


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [f"# Host memory: glibc defaults against pipelocal's settings ({result['started']})\n",
             f"Hardware: {hw['cpu_model']}, {hw['cpu_cores_usable']} cores; torch "
             f"{result['versions']['torch']}; git {result['git']['commit'][:10]}. "
             f"{result['machine_note']}\n",
             f"Command: `{result['command']}` ({result['duration(s)']:.0f} s)\n"]
    rows = []
    for m in result["models"].values():
        for rule, s in m["rules"].items():
            d, k = (s[name] for name in SETTINGS)
            rows.append([m["label"], rule,
                         f"{d['throughput(samples/s)']['median']:.0f}",
                         f"{k['throughput(samples/s)']['median']:.0f}",
                         f"{s['speedup']['median']:.2f} [{s['speedup']['min']:.2f}-"
                         f"{s['speedup']['max']:.2f}]",
                         f"{d['minor_faults/step']['median']:.0f}",
                         f"{k['minor_faults/step']['median']:.0f}"])
    lines.append(markdown_table(
        ["model", "rule", "samples/s, defaults", "samples/s, settings",
         "x (ratio per repeat, median [min-max])", "page faults/step, defaults",
         "page faults/step, settings"], rows) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_mnist_10k(args.data_dir, "host_memory")
    prov = Provenance("host_memory")
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pipelocal-hostmem-") as tmp:
        for name in args.models.split(","):
            runner = Runner(bench_args(["--stages", "1", "--data-dir", args.data_dir]),
                            preset_for(name, args.quick), Path(tmp))
            rules: dict[str, Any] = {}
            for rule in args.rules.split(","):
                reps = []
                for i in range(args.repeats):
                    rep = {}
                    for setting, kept in zip(SETTINGS, (False, True)):
                        runner.env = _env(runner, kept)
                        rep[setting] = runner.peer("single", rule)
                    print(f"[host_memory] {name} {rule} repeat {i + 1}: " + ", ".join(
                        f"{k}: {v['throughput(samples/s)']:.0f} samples/s, "
                        f"{v['minor_faults/step']:.0f} faults/step" for k, v in rep.items()),
                          flush=True)
                    reps.append(rep)
                rules[rule] = {"repeats": reps, **summary(reps)}
            models[name] = {"label": runner.preset.label, "overrides": runner.base,
                            "threads": runner.threads, "rules": rules}
    payload = {"machine_note": args.note, "settings": dict(vars(args)),
               "malloc_env": HOST_MALLOC_ENV, "models": models}
    out = Path(args.out_dir)
    path = write_result(prov, payload, out / "host_memory.json")
    text = markdown(json.loads(path.read_text()))
    (out / "host_memory.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
