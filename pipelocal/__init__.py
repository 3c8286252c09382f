"""pipelocal: supervised local learning, every block trained in its own pipelined worker."""

__version__ = "0.1.0"

# The packages whose modules register datasets, models and rules: importing them here fills the
# registries before any config checks a name against them (pipelocal.registry).
from pipelocal import data as _data  # noqa: F401
from pipelocal import models as _models  # noqa: F401
from pipelocal import rules as _rules  # noqa: F401
