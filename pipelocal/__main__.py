"""``python -m pipelocal`` (and ``torchrun -m pipelocal``): the CLI, with torchrun error records."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from pipelocal.cli import run

sys.exit(record(run)())
