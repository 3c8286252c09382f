"""The MAC cost model: exact counts, and the auxiliary nets moving the balanced partition."""

from __future__ import annotations

from benchmarks.cost import block_costs
from pipelocal.config import load_config
from pipelocal.models import build_model
from pipelocal.pipeline.partition import balanced_partition


def _costs(*overrides: str) -> list:
    cfg = load_config(None, ["model.name=resnet32", "model.width=0.25", *overrides])
    return block_costs(cfg, build_model(cfg.model, (3, 32, 32), 10), 10)


def test_body_macs_are_exact() -> None:
    costs = _costs("rule.name=dgl")
    # stem: conv3x3 3 -> 4 channels on 32x32; stage-1 block: two conv3x3 4 -> 4 on 32x32.
    assert costs[0].body_macs == 32 * 32 * 4 * 27
    assert costs[1].body_macs == 2 * 32 * 32 * 4 * 36
    # the output block: a stage-3 block (two conv3x3 16 -> 16 on 8x8) + linear 16 -> 10.
    assert costs[-1].body_macs == 2 * 8 * 8 * 16 * 144 + 160
    assert costs[-1].rule_macs == 0


def test_auglocal_aux_nets_change_the_balanced_partition() -> None:
    """ResNet-32, AugLocal d = 4: the early blocks' aux nets copy up to four later blocks, so a
    2-stage split balanced on body + aux cost gives stage 0 fewer blocks than one balanced on
    the bodies alone (the split without aux nets)."""
    costs = _costs("rule.name=auglocal", "rule.aux_depth=4")
    body_only = balanced_partition([c.body_macs for c in costs], 2)
    with_aux = balanced_partition([c.train_macs for c in costs], 2)
    assert body_only == [8, 8]
    assert with_aux[0] < body_only[0], with_aux
    # The first blocks' aux nets (4 copied blocks) cost 3x+ their bodies; the last hidden
    # block's (one copy of the output block) about as much as its body.
    assert costs[1].rule_macs > 3 * costs[1].body_macs
    assert costs[1].rule_macs > 3 * costs[14].rule_macs
