"""Tests for the paper recipes (package data of pipelocal.recipes): every Nøkland & Eidnes and
Mostafa et al. row builds its model and trains a step (the AugLocal paper's cells have their own
tests, tests/test_auglocal_recipes.py); every recipe of the three papers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelocal.cli import main
from pipelocal.config import load_config
from pipelocal.engine import Engine, build_blocks
from pipelocal.models import build_model
from pipelocal.recipes import RECIPES_DIR, compare_run, find_recipes, load_recipe

_PATHS = sorted(p for p in RECIPES_DIR.rglob("*.toml") if p.parent.name != "ma-2024")
# Reduced size: every model at a 1/32 (MLP: 16 units) scale, a batch of 4.
_SMALL = ["model.width=0.03125", "model.hidden=16", "model.fc_width=16", "run.epochs=1"]


@pytest.mark.parametrize("path", _PATHS, ids=[p.stem for p in _PATHS])
def test_every_recipe_builds_its_model_and_trains_one_step(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.reported_error and all(
        isinstance(e, (int, float)) or all(isinstance(v, (int, float)) for v in e.values())
        for e in recipe.reported_error.values()
    )
    for rule in recipe.rules:  # every rule column is a valid config
        cfg = recipe.config(rule, _SMALL)
        assert cfg.rule.name == rule
    assert load_config(path).rule.name in recipe.rules  # the file itself trains as it stands
    cfg = recipe.config(recipe.rules[-1], _SMALL)
    specs = build_model(cfg.model, recipe.input, recipe.classes)
    engine = Engine(build_blocks(cfg, specs, recipe.classes, range(len(specs)), "cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *recipe.input, generator=g)
    y = torch.randint(0, recipe.classes, (4,), generator=g)
    out = engine.train_batch(x, y, 0)
    assert out.shape == (4, recipe.classes) and torch.isfinite(out).all()


def test_recipes_cover_the_papers_main_tables() -> None:
    recipes = find_recipes()
    assert {r.paper for r in recipes} == {"Nøkland & Eidnes 2019",
                                          "Mostafa, Ramesh & Cauwenberghs 2018",
                                          "Ma et al. 2024"}
    titles = {r.title for r in recipes if r.paper != "Ma et al. 2024"}
    assert len(titles) == len(_PATHS) == 58
    auglocal = [r for r in recipes if r.paper == "Ma et al. 2024"]
    assert len(auglocal) == 73 and len({r.title for r in auglocal}) == 73
    cell = load_recipe("ma-2024/resnet32_auglocal-d4_cifar10.toml")
    assert cell.reported_error == {"auglocal": round(100 - 93.08, 2)}  # table 1: 93.08 ± 0.10
    assert cell.config().rule.aux_depth == 3 and "93.08 ± 0.10" in cell.note
    assert "Table 4 VGG11B(3x) CIFAR-10" in titles
    assert "Table 2 LEL(SCFB)+DO 3x1000 MLP MNIST" in titles
    row = load_recipe("nokland-eidnes-2019/t4-cifar-10-vgg11b3x.toml")
    assert row.reported_error == {"glob": 5.02, "pred": 7.37, "sim": 9.34, "predsim": 3.97}
    assert row.config("glob").model.nonlin == "relu"
    assert row.config("predsim").model.nonlin == "leaky_relu"
    assert row.config("predsim").model.width == 3.0


def test_recipes_command_lists_titles_and_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "Table 4 VGG11B(3x) CIFAR-10" in out and "predsim 3.97%" in out
    assert main(["recipes", "nokland-eidnes-2019/t1-mnist-vgg8b.toml"]) == 0
    out = capsys.readouterr().out
    assert "--set rule.name=glob --set model.nonlin=relu" in out


def test_compare_run_prints_the_papers_figure_beside_the_run(tmp_path: Path) -> None:
    recipe = load_recipe("mostafa-2018/t2-mnist-3x1000-mlp-sym.toml")
    (tmp_path / "config.toml").write_text('[rule]\nname = "sym"\n')
    record = {"epoch": 3, "test/acc": 0.97,
              "test/acc_local": {"fc1": 0.9, "fc2": 0.95, "fc3": 0.96}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    text = compare_run(recipe, tmp_path)
    assert "fc1      paper 2.20%   this run 10.00%" in text
    assert "fc3      paper 1.80%   this run 4.00%" in text
    assert "output   paper 1.80%   this run 3.00%" in text


def test_compare_run_warns_when_the_run_is_not_the_recipes(tmp_path: Path) -> None:
    """A run of the recipe's own config is compared without a word; another model, fewer
    epochs or another rule is flagged on the first line."""
    from pipelocal.config import to_toml

    recipe = load_recipe("mostafa-2018/t2-mnist-3x1000-mlp-sym.toml")
    record = {"epoch": 3, "test/acc": 0.97, "test/acc_local": {}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "config.toml").write_text(to_toml(recipe.config("sym", ["data.data_dir=/x"])))
    assert not compare_run(recipe, tmp_path).startswith("warning")  # data.data_dir does not count
    (tmp_path / "config.toml").write_text(to_toml(recipe.config("sym", ["run.epochs=3"])))
    first = compare_run(recipe, tmp_path).splitlines()[0]
    assert first.startswith(f"warning: run {str(tmp_path)!r} does not match recipe "), first
    assert "run.epochs: recipe " in first and ", run 3" in first, first
    (tmp_path / "config.toml").write_text(to_toml(recipe.config("sym", ["rule.name=predsim"])))
    assert "rule.name: run 'predsim', recipe " in compare_run(recipe, tmp_path), first
