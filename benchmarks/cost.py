"""A deterministic cost model of a block's training step: multiply-accumulates (MACs) of its
body and of its rule's auxiliary nets, counted on one forward pass.

Timing (``pipelocal plan``) measures the real cost but varies from run to run; the MAC count is
exact and repeatable, so it shows how the auxiliary nets move the balanced partition (AugLocal's
early blocks carry deep auxiliary nets, its late blocks almost none). A training step costs
about 3x its forward MACs (forward, input gradient, weight gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipelocal.config import Config
from pipelocal.engine import LocalBlock, build_blocks
from pipelocal.models import BlockSpec

__all__ = ["BlockMacs", "block_costs", "forward_macs"]


@dataclass(frozen=True)
class BlockMacs:
    """A block's arithmetic cost in MACs per sample (benchmarks' ``BlockCost`` is seconds)."""

    name: str
    body_macs: int
    """MACs of the block's body on one sample (forward)."""
    rule_macs: int
    """MACs of the rule's auxiliary nets on one sample (forward)."""

    @property
    def train_macs(self) -> int:
        """About one training step on one sample: 3x the forward MACs."""
        return 3 * (self.body_macs + self.rule_macs)


def _macs_hook(counter: list[int]) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
            counter[0] += out.numel() * k // module.groups
        elif isinstance(module, nn.Linear):
            counter[0] += out.numel() * module.in_features

    return hook


def forward_macs(module: nn.Module | None, run: Callable[[], object]) -> int:
    """MACs of the Conv2d and Linear layers of ``module`` while ``run()`` executes."""
    if module is None:
        run()
        return 0
    counter = [0]
    handles = [m.register_forward_hook(_macs_hook(counter)) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return counter[0]


@torch.no_grad()
def _block_cost(block: LocalBlock, x: Tensor, y: Tensor, image: Tensor) -> tuple[BlockMacs, Tensor]:
    block.train(True)
    out: list[Tensor] = []
    body = forward_macs(block.body, lambda: out.append(block.body(x)))
    h = out[0]
    rule = forward_macs(block.rule, lambda: block.local_loss(h, y, image))
    b = x.shape[0]
    return BlockMacs(block.spec.name, body // b, rule // b), block.pass_on(h)


def block_costs(cfg: Config, specs: Sequence[BlockSpec], num_classes: int) -> list[BlockMacs]:
    """Per-sample MACs of every block (body, rule) for the model as configured, on the CPU."""
    blocks = build_blocks(cfg, specs, num_classes, range(len(specs)), "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *specs[0].in_shape), generator=gen)  # 2 samples: batch norm needs > 1
    y = torch.randint(num_classes, (2,), generator=gen)
    image, costs = x, []
    for block in blocks:
        cost, x = _block_cost(block, x, y, image)
        costs.append(cost)
    return costs
