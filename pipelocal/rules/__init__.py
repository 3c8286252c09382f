"""Local learning rules, by registered name (``pipelocal rules`` lists them)."""

from pipelocal.config import RuleConfig
from pipelocal.rules import fa, fixed, glob, predsim  # noqa: F401  (registers the rules)
from pipelocal.rules.base import RULES, LocalRule

__all__ = ["RULES", "LocalRule", "available_rules", "build_rule"]


def available_rules() -> list[str]:
    return RULES.names()


def build_rule(shape: tuple[int, ...], num_classes: int, cfg: RuleConfig) -> LocalRule:
    return RULES.get(cfg.name)(shape, num_classes, cfg)
