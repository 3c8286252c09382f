"""Local learning rules, by registered name (``pipelocal rules`` lists them)."""

from pipelocal.config import Config, ConfigError, RuleConfig
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
    "check_micro_batches",
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


def check_micro_batches(cfg: Config) -> None:
    """A ConfigError if ``pipeline.micro_batches > 1`` would change what the rule computes
    beyond summation order: a loss that couples the samples of a batch (see
    :attr:`LocalRule.couples_samples`), unless ``rule.micro_batch_similarity`` asks for it."""
    m = cfg.pipeline.micro_batches
    if m > 1 and RULES.get(cfg.rule.name).couples_samples and not cfg.rule.micro_batch_similarity:
        coupled = ", ".join(n for n in RULES.names() if RULES.get(n).couples_samples)
        raise ConfigError(
            f"pipeline.micro_batches = {m} with rule.name = {cfg.rule.name!r}: its loss "
            f"compares every sample of a batch with every other (a B x B similarity matrix, as "
            f"in {coupled}), so on micro-batches it would be another loss, not the batch's; use "
            "pipeline.micro_batches = 1, a rule whose loss is a mean over samples (pred, "
            "pred-bpf, sym, ...), or set rule.micro_batch_similarity = true to take the "
            "similarity within each micro-batch"
        )
