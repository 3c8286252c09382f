"""The one-GPU check: what only a CUDA device can show, measured in a few minutes.

    bash benchmarks/gpu_check.sh                # on a machine with one CUDA GPU: writes $OUT
    python -m benchmarks gpu_check --out DIR    # the measurements alone
    python -m benchmarks gpu_check --dry-run    # every step on the CPU at toy sizes (no CUDA)

Steps, each recorded in ``gpu_check.json`` with its verdict:

* ``repeat``: two single-GPU runs (run.deterministic, the default) give the same bits; the same
  for bf16; a run stopped at step 7 and resumed ends bitwise as the straight run.
* ``rules``: every registered rule's first training and evaluation step under
  ``run.deterministic`` (none may raise, as a nondeterministic op would).
* ``host_sync``: steady-state training steps of the single-process engine under
  ``torch.cuda.set_sync_debug_mode("error")``: any host-device synchronisation raises.
* ``timers``: CUDA-event busy time against wall time, and the memory figures, of a run's epoch.
* ``throughput``: samples/s and peak allocated memory of ``glob``, ``pred`` and ``predsim`` on
  full-width VGG8B, batch 128, synthetic-cifar, fp32 and bf16 (after warm-up, CUDA-synchronised
  clock around N steps).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Provenance, write_result
from pipelocal.config import Config, ConfigError, load_config
from pipelocal.data import load_dataset, make_loaders
from pipelocal.determinism import configure_determinism
from pipelocal.engine import Engine, build_blocks
from pipelocal.launch import train
from pipelocal.models import build_model
from pipelocal.rules import RULES

__all__ = ["main"]

_TINY = ["model.name=cnn", "model.width=0.25", "model.fc_width=32", "model.dropout=0.1",
         "data.train_limit=300", "data.batch_size=64", "data.eval_batch_size=100",
         "rule.name=predsim", "run.epochs=2", "run.progress=false", "pipeline.stages=1"]
_RULE_MODEL = {"auglocal": ["model.name=resnet32", "model.width=0.25"],
               "dgl": ["model.name=resnet32", "model.width=0.25"],
               "infopro": ["model.name=resnet32", "model.width=0.25"]}
"""Rules that need conv features everywhere run on a small ResNet; the others on the tiny CNN."""


def _tensors(run_dir: str | Path) -> dict[int, Any]:
    from pipelocal.checkpoint import block_file, read_manifest, resolve_checkpoint

    ckpt = resolve_checkpoint(run_dir)
    return {i: torch.load(block_file(ckpt, i), map_location="cpu", weights_only=False)
            for i in range(read_manifest(ckpt)["num_blocks"])}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class Check:
    """Runs the steps on ``device``, collecting results; a failing step is recorded, not fatal."""

    def __init__(self, device: str, runs: Path) -> None:
        self.device, self.runs = device, runs
        self.results: dict[str, Any] = {}

    def cfg(self, name: str, *overrides: str) -> Config:
        return load_config(None, [*_TINY, f"run.device={self.device}",
                                  f"run.out_dir={self.runs}", f"run.name={name}", *overrides])

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # a step's failure is its result; the other steps still run
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=8)}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        self.results[name] = out
        print(f"{name:12s} {'ok' if out.get('ok') else 'FAILED'}  ({out['seconds']} s)"
              + ("" if out.get("ok") else f"  {out.get('error', '')}"), flush=True)

    def repeat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            a = train(self.cfg(f"{precision}-a", f"run.precision={precision}"))
            b = train(self.cfg(f"{precision}-b", f"run.precision={precision}"))
            out[f"{precision}_repeats_bitwise"] = _equal(_tensors(a["run_dir"]),
                                                         _tensors(b["run_dir"]))
            out[f"{precision}_test_acc"] = [a["test/acc"], b["test/acc"]]
        straight = self.runs / "fp32-a"
        first = train(self.cfg("resume", "run.max_steps=7"))
        resumed = train(self.cfg("resume"), resume=first["run_dir"])
        out["resume_equals_straight"] = _equal(_tensors(resumed["run_dir"]), _tensors(straight))
        out["ok"] = all(v for k, v in out.items() if k.endswith(("bitwise", "straight")))
        return out

    def rules(self) -> dict[str, Any]:
        raised: dict[str, str] = {}
        for rule in RULES.names():
            cfg = self.cfg(f"rule-{rule}", f"rule.name={rule}", *_RULE_MODEL.get(rule, []))
            try:
                engine, batch = _engine(cfg, self.device, batch_size=16)
                engine.train_batch(*batch, epoch=0)
                engine.eval_batch(*batch)
                _sync(self.device)
            except ConfigError:
                raise
            except Exception as exc:
                raised[rule] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return {"ok": not raised, "rules": RULES.names(), "raised": raised}

    def host_sync(self) -> dict[str, Any]:
        engine, batch = _engine(self.cfg("sync"), self.device, batch_size=64)
        engine.train_batch(*batch, epoch=0)  # warm-up: allocations, cuDNN plans
        steps = 5
        with _sync_debug_errors(self.device):
            for _ in range(steps):
                engine.train_batch(*batch, epoch=0)
        return {"ok": True, "steps_without_sync": steps}

    def timers(self) -> dict[str, Any]:
        result = train(self.cfg("timers", "run.epochs=1"))
        import json

        record = json.loads((Path(result["run_dir"]) / "metrics.jsonl").read_text()
                            .splitlines()[-1])
        stage = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("stage0/")}
        busy, wall = stage.get("busy(s)"), stage.get("wall(s)")
        ok = busy is not None and wall is not None and 0 < busy <= wall
        if self.device == "cuda":
            ok = ok and stage.get("max_allocated(MiB)", 0) > 0 and stage.get("deterministic")
        return {"ok": bool(ok), "stage0": stage}

    def throughput(self, width: float, batch: int, steps: int) -> dict[str, Any]:
        rows = []
        for rule in ("glob", "pred", "predsim"):
            for precision in ("fp32", "bf16"):
                cfg = self.cfg("tp", "model.name=vgg8b", f"model.width={width}",
                               "model.fc_width=1024" if width == 1.0 else "model.fc_width=32",
                               "data.name=synthetic-cifar", "data.train_limit=1024",
                               f"rule.name={rule}", f"run.precision={precision}",
                               f"data.batch_size={batch}")
                engine, data = _engine(cfg, self.device, batch_size=batch)
                for _ in range(2):  # warm-up
                    engine.train_batch(*data, epoch=0)
                _sync(self.device)
                if self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.train_batch(*data, epoch=0)
                _sync(self.device)  # CPU-GPU sync point: the clock covers the kernels
                seconds = time.perf_counter() - t0
                peak = (torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda"
                        else None)
                rows.append({"rule": rule, "precision": precision, "batch": batch,
                             "steps": steps, "samples/s": round(batch * steps / seconds, 1),
                             "max_allocated(MiB)": None if peak is None else round(peak, 1)})
                print(f"  {rule:8s} {precision}  {rows[-1]['samples/s']:>10,.1f} samples/s  "
                      f"peak {rows[-1]['max_allocated(MiB)']} MiB", flush=True)
        return {"ok": True, "model": f"vgg8b width {width}", "rows": rows}


def _engine(cfg: Config, device: str, *, batch_size: int) -> tuple[Engine, tuple[Any, Any]]:
    """The whole model of ``cfg`` on ``device`` and one training batch on it."""
    dev = torch.device(device)
    configure_determinism(dev, cfg.run.deterministic)
    data = load_dataset(cfg.data)
    specs = build_model(cfg.model, tuple(data.in_shape), data.num_classes)
    engine = Engine(build_blocks(cfg, specs, data.num_classes, range(len(specs)), dev))
    train_loader, _ = make_loaders(data, cfg.data, cfg.run.seed)
    x, y = train_loader.batch(0, 0)  # [batch_size, C, H, W], normalised as in training
    return engine, (x.to(dev), y.to(dev))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _sync_debug_errors(device: str) -> Iterator[None]:
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for gpu_check.json (default: "
                        "benchmarks/results/gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU at toy sizes: checks the script, not a GPU")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run it on a GPU machine, or with --dry-run "
              "to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(1)
    prov = Provenance("gpu_check")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(device, Path(tmp))
        check.step("repeat", check.repeat)
        check.step("rules", check.rules)
        check.step("host_sync", check.host_sync)
        check.step("timers", check.timers)
        if args.dry_run:
            check.step("throughput", lambda: check.throughput(0.0625, 8, 1))
        else:
            check.step("throughput", lambda: check.throughput(1.0, 128, 20))
    ok = all(r.get("ok") for r in check.results.values())
    out = None if args.out is None else Path(args.out) / "gpu_check.json"
    path = write_result(prov, {"device": device, "dry_run": args.dry_run, "ok": ok,
                               "steps": check.results}, out)
    print(f"gpu_check: {'all steps passed' if ok else 'FAILED'}; results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
