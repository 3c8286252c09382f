"""One metrics interface: a progress bar on stderr, JSONL in the run directory, plain lines,
optionally TensorBoard.

Keys are namespaced and carry their units, e.g. ``train/loss``, ``test/acc``,
``throughput(samples/s)``, ``stage1/busy(s)``, ``stage1/peak_rss(MiB)``. Every JSONL record
carries ``time`` (Unix seconds) and is strict JSON: a NaN or Inf value is written as null.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["Metrics", "strict_json"]


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class Metrics:
    def __init__(self, run_dir: Path | None, *, progress: bool = True,
                 tensorboard: bool = False) -> None:
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self.progress = progress
        self._bar: tqdm | None = None
        self._tb: Any = None
        if tensorboard and run_dir is not None:
            if importlib.util.find_spec("tensorboard") is None:
                raise ModuleNotFoundError(
                    "run.tensorboard = true needs the tensorboard package: pip install "
                    "tensorboard, or set run.tensorboard = false")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON record (with its ``time``) to metrics.jsonl."""
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(strict_json({**record, "time": round(time.time(), 3)}),
                                   allow_nan=False) + "\n")

    def drop_after(self, epoch: int) -> None:
        """Forget records of epochs after ``epoch`` (1-based): a resumed run redoes them, and
        a kill between an epoch's record and its checkpoint must not log that epoch twice."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) <= epoch]
        if len(kept) != len(lines):
            self.path.write_text("".join(kept))

    def scalars(self, record: dict[str, Any]) -> None:
        """The epoch's numbers to TensorBoard (when on): losses, accuracies, per-stage busy."""
        if self._tb is None:
            return
        step = record["epoch"]
        for key, value in record.items():
            if isinstance(value, dict):
                for name, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"{key}/{name}", v, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.close_bar()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

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
