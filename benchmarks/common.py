"""Shared helpers of the benchmark scripts: provenance, run plumbing, statistics, tables.

Every benchmark writes one JSON file (``benchmarks/results/<name>.json`` unless ``--out`` says
otherwise) holding what is needed to trust or reproduce its numbers: the hardware, the library
versions, the git revision (with a dirty flag and the changed paths), the command line, the
resolved config of every run, time stamps and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "MNIST_10K_DIR",
    "REPO_ROOT",
    "RESULTS_DIR",
    "Provenance",
    "add_common_args",
    "cpu_meter",
    "fmt_stat",
    "git_revision",
    "hardware",
    "markdown_table",
    "read_metrics",
    "read_run_config",
    "require_mnist_10k",
    "run_root",
    "summarize",
    "versions",
    "write_result",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DOCS_IMG_DIR = REPO_ROOT / "docs" / "img"
"""Plots of the committed results, where the docs (GitHub and the MkDocs site) show them."""


# --------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def hardware() -> dict[str, Any]:
    """CPU model, core counts, RAM and GPUs (via torch.cuda) of this machine."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpus": gpus,
        "machine": platform.machine(),
        "os": platform.platform(),
        "hostname": platform.node(),
    }


def versions() -> dict[str, str | None]:
    import torch

    import pipelocal

    try:
        import torchvision

        tv: str | None = torchvision.__version__
    except ImportError:
        tv = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "pipelocal": pipelocal.__version__,
    }


def git_revision(root: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD commit and whether the working tree differs from it (with the changed paths)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # "XY path" lines; not stripped, X may be a space.
        changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"commit": None, "dirty": None, "error": str(exc)}
    return {"commit": commit, "dirty": bool(changed), "changed_paths": changed}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class Provenance:
    """Captured when a benchmark starts; ``finish()`` adds the end time and load."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.t0 = time.perf_counter()
        self.load_before = _load()
        self.threads = _torch_threads()  # before any run changes it (run.threads does)
        # Captured at the start: the code that runs is the code at this revision.
        self.git = git_revision()

    def finish(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "command": shlex.join(sys.orig_argv),  # as typed: `python -m benchmarks NAME ...`
            "cwd": os.getcwd(),
            "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration(s)": round(time.perf_counter() - self.t0, 1),
            # 1-minute load average: well above 0 before a timing benchmark = a busy machine.
            "load_avg_1_5_15": {"before": self.load_before, "after": _load()},
            "hardware": hardware(),
            "versions": versions(),
            "torch_threads_at_start": self.threads,
            "git": self.git,
        }


def write_result(prov: Provenance, payload: dict[str, Any], out: str | Path | None) -> Path:
    """Write provenance + payload as JSON to ``out`` (default results/<name>.json)."""
    path = Path(out) if out else RESULTS_DIR / f"{prov.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**prov.finish(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- runs

MNIST_10K_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist-10k"
_MNIST_10K_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def require_mnist_10k(data_dir: str | Path, who: str) -> None:
    """Exit with a message naming the folder and the files when mnist-10k is not there."""
    folder = Path(data_dir)
    missing = [
        f"{stem}[.gz]"
        for stem in _MNIST_10K_FILES
        if not any((folder / (stem + ext)).is_file() for ext in (".gz", ""))
    ]
    if missing:
        sys.exit(
            f"{who}: the MNIST test split (mnist-10k) is not at {folder}: missing "
            f"{', '.join(missing)}. Put the two IDX files there or pass --data-dir FOLDER "
            f"(the project keeps them in {MNIST_10K_DIR})."
        )


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"independent runs (seeds 0..n-1) per setting (default {repeats})",
    )
    parser.add_argument(
        "--out", default=None, help="result JSON path (default benchmarks/results/<name>.json)"
    )
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="keep the pipelocal run directories here (default: a temporary "
        "folder, deleted at the end)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra config override, applied last (repeatable)",
    )


@contextmanager
def run_root(runs_dir: str | None) -> Iterator[Path]:
    """Where the runs' directories go: ``runs_dir`` (kept) or a temporary folder (deleted)."""
    if runs_dir:
        path = Path(runs_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="pipelocal-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds (user + system) of this process and its finished children.

    Spawned pipeline stages count once they have been joined. ``cores_used`` = CPU / wall: on an
    otherwise idle machine a 2-stage pipeline keeps it near 2; far less while stages compute
    means other work took the cores (stage busy times, being wall times, cannot show that).
    """
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    self0, kids0 = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    yield out
    wall = time.perf_counter() - t0
    self1, kids1 = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu_self = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    cpu_kids = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    out.update(
        {
            "wall(s)": round(wall, 3),
            "cpu_self(s)": round(cpu_self, 3),
            "cpu_children(s)": round(cpu_kids, 3),
            "cores_used": round((cpu_self + cpu_kids) / max(wall, 1e-9), 3),
        }
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run (``<run_dir>/metrics.jsonl``), in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config the run wrote (``config.toml``; a pipeline's holds its partition)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((Path(run_dir) / "config.toml").read_text())


# --------------------------------------------------------------------------- statistics, tables


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


def fmt_stat(s: dict[str, Any], digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std (min-max, n=...)`` of a :func:`summarize` result."""
    if not s["n"]:
        return "-"
    m, sd, lo, hi = (scale * s[k] for k in ("mean", "std", "min", "max"))
    return f"{m:.{digits}f} ± {sd:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f}, n={s['n']})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small GitHub-markdown table; columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
