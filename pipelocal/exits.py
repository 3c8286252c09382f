"""Exit statuses of ``pipelocal train`` and the one line said for each way a run can end.

    0    done (or already complete)
    1    a worker failed (its stage, position and traceback are printed)
    2    a config, data or checkpoint problem, a run directory in use or holding another run,
         a full disk (nothing was started, or the last complete checkpoint is named)
    3    a non-finite loss (the block, its position and the last good checkpoint are named)
    130  stopped by Ctrl-C or SIGTERM (after writing a checkpoint, or during set-up)

Used by the CLI and by a torchrun rank, which must leave with ``os._exit`` (see
:mod:`pipelocal.launch.torchrun`) and so cannot return through the CLI. Torch-free at import.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_USAGE", "STATUS_FILE_ENV",
           "exit_status", "write_status"]

EXIT_FAILED = 1
"""A worker failed."""
EXIT_USAGE = 2
"""A config, data or checkpoint problem (or a full disk)."""
EXIT_NONFINITE = 3
"""Exit status of a run stopped by a NaN/Inf loss (1 = a failure, 2 = a config error)."""
EXIT_INTERRUPTED = 130
"""Exit status of a run stopped by Ctrl-C or SIGTERM (after its checkpoint): 128 + SIGINT."""
STATUS_FILE_ENV = "PIPELOCAL_STATUS_FILE"
"""If set, the process that speaks for the run (rank 0 under torchrun) writes its exit status
there: ``launch/torchrun.sh`` exits with it, since torchrun itself exits 1 after any signal."""


def exit_status(exc: BaseException) -> tuple[int, str] | None:
    """(status, the line to print on stderr) for an exception that ends a run; None if it is a
    bug (the traceback is the report)."""
    from pipelocal.config import ConfigError
    from pipelocal.launch.spawn import PipelineError
    from pipelocal.stop import Interrupted
    from pipelocal.trainer import NonFiniteLoss

    if isinstance(exc, PipelineError):
        return EXIT_FAILED, f"pipelocal: pipeline failed: {exc}"
    if isinstance(exc, Interrupted):
        return EXIT_INTERRUPTED, f"pipelocal: {exc}"
    if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C before the run could checkpoint
        return EXIT_INTERRUPTED, ("pipelocal: aborted by a second interrupt before a checkpoint "
                                  "was written; earlier checkpoints, if any, are untouched")
    if isinstance(exc, NonFiniteLoss):
        return EXIT_NONFINITE, f"pipelocal: training diverged: {exc}"
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, f"pipelocal: config error: {exc}"
    if isinstance(exc, FileNotFoundError):  # missing dataset files, checkpoints, a full disk
        return EXIT_USAGE, f"pipelocal: {exc}"
    return None


def write_status(code: int) -> None:
    """Record ``code`` for a wrapper script, when :data:`STATUS_FILE_ENV` asks for it."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        Path(path).write_text(f"{code}\n")
