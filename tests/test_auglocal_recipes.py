"""Every AugLocal-paper recipe loads, matches its generator, and trains one step at tiny size."""

from __future__ import annotations

import pytest
import torch

from pipelocal.config import load_config
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model
from pipelocal.recipes import RECIPES_DIR
from pipelocal.recipes.ma_2024 import recipes

RECIPES = RECIPES_DIR / "ma-2024"

_TINY = ["model.width=0.0625", "model.fc_width=16", "model.input_shape=[3, 16, 16]"]


def test_recipe_files_are_the_generated_ones_and_load() -> None:
    files = {p.stem: p.read_text() for p in RECIPES.glob("*.toml")}
    assert files == recipes()
    # Tables 1 (2 nets x 9 methods x 3 sets), 2 (6 x 2) and 4 (7 rows).
    assert len(files) == 54 + 12 + 7
    for name, text in files.items():
        assert "# paper: " in text and "[recipe]" in text, name  # the figure to reproduce
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


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_recipe_uses_the_authors_settings(name: str) -> None:
    """ChenxiangMA/AugLocal: ``train.py`` lines 129-152 (transforms), 125 (SVHN split 'train'),
    84 (AugLocal's top), 430-438 (warm-up); ``networks/resnet.py`` 166-172 (init);
    ``exp_imagenet/imagenet_DDP.py`` 474-477 (ImageNet: the cosine alone)."""
    cfg = load_config(RECIPES / f"{name}.toml", [])
    assert cfg.model.init == "he-normal"
    imagenet = name.endswith("_imagenet")
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs) == ("cosine", 0 if imagenet else 10)
    if not imagenet:
        assert cfg.schedule.warmup_start_lr == 0.01
    data = {"cifar10": (("padcrop", "flip"), 4, "reflect"), "svhn": (("padcrop",), 2, "zeros"),
            "stl10": (("padcrop", "flip"), 4, "zeros")}
    dataset = name.rsplit("_", 1)[1]
    if dataset in data:
        assert (cfg.data.name, (cfg.data.augment, cfg.data.pad_px, cfg.data.pad_mode)) == (
            dataset, data[dataset])
    if cfg.rule.name == "auglocal":
        assert cfg.rule.top_layers == "backprop"
    if cfg.rule.name == "predsim":
        assert not cfg.rule.zero_init
