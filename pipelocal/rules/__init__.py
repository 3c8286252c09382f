"""Local learning rules, by registered name (``pipelocal rules`` lists them)."""

from pipelocal.config import RuleConfig
from pipelocal.rules import (  # noqa: F401  (registers the rules)
    auglocal,
    dgl,
    fa,
    fixed,
    glob,
    infopro,
    predsim,
)
from pipelocal.rules.base import RULES, LocalRule
from pipelocal.rules.context import RuleContext

__all__ = ["RULES", "LocalRule", "RuleContext", "available_rules", "build_rule"]


def available_rules() -> list[str]:
    return RULES.names()


def build_rule(
    shape: tuple[int, ...],
    num_classes: int,
    cfg: RuleConfig,
    context: RuleContext | None = None,
) -> LocalRule:
    """The rule of a block with output ``shape``; ``context`` is passed to rules that need it."""
    cls = RULES.get(cfg.name)
    if not getattr(cls, "needs_context", False):
        return cls(shape, num_classes, cfg)
    if context is None:
        raise ValueError(
            f"rule {cfg.name!r} is built from the model around its block; pass "
            "context=RuleContext(specs, index) (engine.build_blocks does)"
        )
    return cls(shape, num_classes, cfg, context=context)
