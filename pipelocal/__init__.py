"""pipelocal: supervised local learning, every block trained in its own pipelined worker."""

__version__ = "0.1.0"
