"""Local learning rules, by registered name (``pipelocal rules`` lists them)."""

from pipelocal.config import ConfigError, RuleConfig
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

__all__ = [
    "RULES",
    "LocalRule",
    "RuleContext",
    "build_rule",
    "end_to_end_top",
]


def build_rule(
    shape: tuple[int, ...],
    num_classes: int,
    cfg: RuleConfig,
    context: RuleContext | None = None,
) -> LocalRule:
    """The rule of a block with output ``shape``; ``context`` is passed to rules that need it."""
    cls = RULES.get(cfg.name)
    if not cls.needs_context:
        return cls(shape, num_classes, cfg)
    if context is None:
        raise ValueError(
            f"rule {cfg.name!r} is built from the model around its block; pass "
            "context=RuleContext(specs, index) (engine.build_blocks does)"
        )
    return cls(shape, num_classes, cfg, context=context)


def end_to_end_top(cfg: RuleConfig, num_blocks: int) -> range:
    """The top blocks that learn together, end to end, from the output loss: range(k, n).

    Length 1 (the output block) for most local rules, every block for a global rule; under
    AugLocal with ``rule.top_layers = "backprop"`` the last ``aux_depth + 1``. A pipeline keeps
    them in one stage. A ConfigError if a local rule would leave no block to learn locally.
    """
    cls = RULES.get(cfg.name)
    if cls.is_global:
        return range(0, num_blocks)
    k = cls.end_to_end_layers(cfg)
    if k >= num_blocks:
        raise ConfigError(
            f"rule.name = {cfg.name!r} with rule.aux_depth = {cfg.aux_depth} and "
            f"rule.top_layers = {cfg.top_layers!r} trains the top aux_depth + 1 = {k} blocks "
            f"end to end, but the model has only {num_blocks}: no block is left with an "
            f"auxiliary net; use rule.aux_depth <= {num_blocks - 2}, or rule.top_layers = "
            "'local'"
        )
    return range(num_blocks - k, num_blocks)
