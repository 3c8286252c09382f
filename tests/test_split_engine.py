"""The pipeline's exactness, in one process, for every rule and model: an engine over the first
block followed by an engine over the rest, fed what the first one passes on (and the input
image, as the channel carries it), trains every block bitwise as the whole model's engine does.

The process boundary itself (the channel, the wire dtype, the launchers) is proven once per wire
path in tests/test_transparency.py; this file is what lets that one stay short.
"""

from __future__ import annotations

import pytest
import torch

from pipelocal.config import Config, ConfigError, ModelConfig, RuleConfig
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import MODELS, build_model
from pipelocal.rules import RULES
from tests.conftest import assert_identical
from tests.test_models import CASES

NUM_CLASSES = 10
_DEFAULT = ({"width": 0.0625, "fc_width": 32}, (3, 32, 32))
_SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "vgg8b": (1, 28, 28), "vgg11b": (1, 28, 28)}
_LOCAL = [r for r in RULES.names() if not RULES.get(r).is_global]


def _cases() -> list:
    pairs = {(rule, model) for rule in _LOCAL for model in ("cnn", "mlp", "resnet20")}
    pairs |= {("predsim", model) for model in MODELS.names()}
    pairs |= {("dgl", "resnet32"), ("infopro", "vgg19"), ("auglocal", "vgg19")}
    return [pytest.param(r, m, id=f"{r}-{m}") for r, m in sorted(pairs)]


def _build(rule: str, model: str, similarity: bool = False) -> tuple[list, tuple[int, ...]]:
    overrides = {**CASES.get(model, _DEFAULT)[0], "dropout": 0.1}
    cfg = Config(model=ModelConfig(name=model, **overrides),
                 rule=RuleConfig(name=rule, micro_batch_similarity=similarity))
    shape = _SHAPES.get(model, _DEFAULT[1])
    try:
        specs = build_model(cfg.model, shape, NUM_CLASSES)
        return build_blocks(cfg, specs, NUM_CLASSES, range(len(specs)), "cpu"), shape
    except ConfigError as exc:
        pytest.skip(f"{rule} does not apply to {model}: {exc}")


@pytest.mark.parametrize(("rule", "model"), _cases())
def test_first_block_then_the_rest_equals_the_whole(rule: str, model: str) -> None:
    _check_split(rule, model, micro_batches=1)


# Micro-batches (pipeline.micro_batches = 2) on the paths that differ: batch norm and dropout
# on micro-batches (cnn), the classifier on the passed-on activation (sym), the input image
# split with the activation (infopro), the end-to-end top (auglocal), per-micro-batch
# similarity (predsim with rule.micro_batch_similarity).
_MICRO = [("pred", "cnn"), ("sym", "mlp"), ("predsim", "cnn"), ("infopro", "vgg19"),
          ("auglocal", "vgg19")]


@pytest.mark.parametrize(("rule", "model"), [pytest.param(r, m, id=f"{r}-{m}")
                                             for r, m in _MICRO])
def test_first_block_then_the_rest_equals_the_whole_in_micro_batches(rule: str,
                                                                     model: str) -> None:
    _check_split(rule, model, micro_batches=2)


def _check_split(rule: str, model: str, *, micro_batches: int) -> None:
    """The whole model's engine against an engine over the first block chained into one over
    the rest, all three with ``micro_batches``; batches of 6 rows, then a short one of 5."""
    whole_blocks, shape = _build(rule, model, similarity=micro_batches > 1)
    split_blocks, _ = _build(rule, model, similarity=micro_batches > 1)
    whole, head, tail = (Engine(b, micro_batches=micro_batches)
                         for b in (whole_blocks, split_blocks[:1], split_blocks[1:]))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,),
                                                                   generator=g))
               for n in ((6, 6) if micro_batches == 1 else (6, 5))]
    for epoch, (x, y) in enumerate(batches):
        out = whole.train_batch(x, y, epoch)
        h = head.train_batch(x, y, epoch)
        assert torch.equal(tail.train_batch(h, y, epoch, image=x), out)
    for x, y in batches:
        whole.eval_batch(x, y)
        tail.eval_batch(head.eval_batch(x, y), y)
    assert whole.pop_eval_stats() == {**head.pop_eval_stats(), **tail.pop_eval_stats()}
    assert whole.pop_train_stats() == {**head.pop_train_stats(), **tail.pop_train_stats()}
    for a, b in zip(whole_blocks, split_blocks):
        assert_identical(a.checkpoint_state(), b.checkpoint_state(), b.spec.name)
