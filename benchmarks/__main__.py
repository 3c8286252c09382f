"""Run one benchmark: ``python -m benchmarks NAME [args]``; ``python -m benchmarks --help``.

Each name maps to a module with a ``main(argv) -> int``; the one-line description shown by
``--help`` is the first line of that module's docstring, read without importing it (so the
listing does not import torch).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BENCHMARKS", "describe", "main"]

BENCHMARKS: dict[str, str] = {
    "bench": "benchmarks.headline.bench",
    "replicas": "benchmarks.headline.replicas",
    "host_memory": "benchmarks.headline.host_memory",
    "tta": "benchmarks.headline.tta",
    "mnist_realdata": "benchmarks.mnist_realdata",
    "mostafa_mnist": "benchmarks.mostafa_mnist",
    "auglocal_resnet": "benchmarks.auglocal_resnet",
    "pipeline_efficiency": "benchmarks.pipeline_efficiency",
    "data_wait": "benchmarks.data_wait",
    "gpu_check": "benchmarks.gpu_check",
}
"""Benchmark name -> module holding its ``main(argv)``."""


def describe(name: str) -> str:
    """The first line of the benchmark module's docstring."""
    spec = importlib.util.find_spec(BENCHMARKS[name])
    assert spec is not None and spec.origin is not None, BENCHMARKS[name]
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage() -> str:
    width = max(map(len, BENCHMARKS))
    rows = [f"  {name:<{width}}  {describe(name)}" for name in BENCHMARKS]
    return ("usage: python -m benchmarks NAME [args]   (NAME --help for its options)\n\n"
            "benchmarks:\n" + "\n".join(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"python -m benchmarks: unknown benchmark {name!r}; available: "
              f"{', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    sys.argv[0] = f"python -m benchmarks {name}"  # argparse's prog in usage and errors
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
