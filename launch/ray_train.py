"""Entry point for ``ray submit``: run ``pipelocal train --launcher ray ARGS`` on the cluster's
head node, as the driver of the cluster Ray already runs there.

    ray submit launch/ray_cluster.yaml launch/ray_train.py --stages 3 --set run.epochs=5

``ray submit`` copies this file to the head and runs it with Python; pipelocal itself is
installed on every node by the cluster YAML's setup_commands. For ``ray job submit`` no such
file is needed: its entry point is the ``pipelocal`` command itself.
"""

from __future__ import annotations

import os
import sys

from pipelocal.cli import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")  # the cluster on this node, never a new one
    sys.exit(main(["train", "--launcher", "ray", *sys.argv[1:]]))
