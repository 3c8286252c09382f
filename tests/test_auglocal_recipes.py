"""Every AugLocal-paper recipe loads, matches its generator, and trains one step at tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipelocal.config import load_config
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "auglocal"
sys.path.insert(0, str(RECIPES))
from generate import recipes  # noqa: E402

_TINY = ["model.width=0.0625", "model.fc_width=16", "model.input_shape=[3, 16, 16]"]


def test_recipe_files_are_the_generated_ones_and_load() -> None:
    files = {p.stem: p.read_text() for p in RECIPES.glob("*.toml")}
    assert files == recipes()
    # Tables 1 (2 nets x 9 methods x 3 sets), 2 (6 x 2) and 4 (7 rows).
    assert len(files) == 54 + 12 + 7
    for name, text in files.items():
        assert "# paper: " in text, name  # every recipe names the figure it should reproduce
        load_config(RECIPES / f"{name}.toml", [])


# The datasets of a table row share model and rule: one step per row (its first dataset).
_ROWS = sorted(p.stem for p in RECIPES.glob("*.toml") if p.stem.endswith(("_cifar10",
                                                                           "_imagenet")))


@pytest.mark.parametrize("name", _ROWS)
def test_recipe_trains_one_step_at_reduced_size(name: str) -> None:
    cfg = load_config(RECIPES / f"{name}.toml", _TINY)
    specs = build_model(cfg.model, (3, 16, 16), 10)
    blocks = build_blocks(cfg, specs, 10, range(len(specs)), "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    out = Engine(blocks).train_batch(x, y, epoch=0)
    assert out.shape == (4, 10)
    losses = [b.pop_stats()["loss"] for b in blocks]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses), losses
