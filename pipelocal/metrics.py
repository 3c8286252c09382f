"""One metrics interface: a progress bar on stderr, JSONL in the run directory, plain lines.

Keys are namespaced and carry their units, e.g. ``train/loss``, ``test/acc``,
``throughput(samples/s)``, ``stage1/busy(s)``, ``stage1/peak_mem(MiB)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, run_dir: Path | None, *, progress: bool = True) -> None:
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self.progress = progress
        self._bar: tqdm | None = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON record to metrics.jsonl."""
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def echo(self, text: str) -> None:
        """A line for the user, printed above the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int = 0) -> None:
        self.close_bar()
        if self.progress:
            self._bar = tqdm(
                total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                leave=False, dynamic_ncols=True, file=sys.stderr,
            )

    def advance(self, samples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{samples_per_s:,.0f} samples/s", refresh=False)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
