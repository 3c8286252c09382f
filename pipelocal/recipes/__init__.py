"""Recipes: one TOML file per row of the papers' main result tables, with the reported errors.

The files are package data, below this package: ``nokland-eidnes-2019/``, ``mostafa-2018/``
and ``ma-2024/`` (AugLocal, DGL and InfoPro, written by :mod:`pipelocal.recipes.ma_2024`), so
``pipelocal recipes`` works the same from a checkout, a wheel or a container image.

A recipe is an ordinary config file (``pipelocal train --config RECIPE``) plus a ``[recipe]``
table that the config loader ignores::

    [recipe]
    title = "Table 4 VGG11B(3x) CIFAR-10"
    paper = "Nøkland & Eidnes 2019"
    input = [3, 32, 32]            # what the dataset feeds the model
    classes = 10
    reported_error = {glob = 5.02, pred = 7.37, sim = 9.34, predsim = 3.97}   # test error, %
    [recipe.rule_overrides]        # per rule column, e.g. the paper's ReLU for glob/pred
    glob = ["model.nonlin=relu"]

``pipelocal recipes`` lists them; ``pipelocal recipes RECIPE --run RUN_DIR`` prints the
paper's figure beside the run's. Errors per layer (Mostafa et al.'s tables) are dicts
``{layer name: error}`` under ``reported_error.<rule>``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelocal.config import Config, ConfigError, apply_overrides, config_to_dict, from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "RECIPES_DIR", "Recipe", "compare_run", "find_recipes", "load_recipe", "mismatches",
    "recipe_path",
]

_COMPARED = {"model": None, "rule": None, "optim": None, "schedule": None,
             "data": ("name", "augment"), "run": ("epochs",)}
"""What a run must share with a recipe for the paper's figure to be its target (None: the
whole section); where the data lives, how it is fed and how the run is laid out do not count."""

RECIPES_DIR = Path(__file__).resolve().parent
"""Where the recipe files are: this package's folder, in a checkout or an installed wheel."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    path: Path
    title: str
    paper: str
    input: tuple[int, int, int]
    classes: int
    reported_error: dict[str, Any]
    """rule -> test error in % (a number, or {layer: error} for per-layer tables)."""
    rule_overrides: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    """The config sections of the file."""

    @property
    def rules(self) -> list[str]:
        return list(self.reported_error)

    def config(self, rule: str | None = None, overrides: list[str] | None = None) -> Config:
        """The validated config of rule column ``rule`` (default: the file's rule)."""
        data = json.loads(json.dumps(self.body))
        if rule is not None:
            data = apply_overrides(data, [f"rule.name={rule}", *self.rule_overrides.get(rule, [])])
        return from_dict(apply_overrides(data, overrides or []))

    def headline(self, rule: str) -> float | None:
        """One error per rule: the number, or the last layer's of a per-layer row."""
        err = self.reported_error.get(rule)
        if isinstance(err, dict):
            return list(err.values())[-1] if err else None
        return err


def recipe_path(name: str | Path) -> Path:
    """``name`` as a file: a path that exists, else a packaged recipe's name
    (``nokland-eidnes-2019/t4-cifar-10-vgg11b3x.toml``); else ``name`` unchanged."""
    p = Path(name)
    if not p.is_file() and (RECIPES_DIR / p).is_file():
        return RECIPES_DIR / p
    return p


def load_recipe(path: str | Path) -> Recipe:
    p = recipe_path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; `pipelocal recipes` lists them")
    data = tomllib.loads(p.read_text())
    meta = data.pop("recipe", None)
    if not isinstance(meta, dict):
        raise ConfigError(f"recipe {str(p)!r} has no [recipe] table; add title, paper, input, "
                          "classes and reported_error")
    missing = {"title", "paper", "input", "classes", "reported_error"} - set(meta)
    if missing:
        raise ConfigError(f"recipe {str(p)!r}: [recipe] lacks {', '.join(sorted(missing))}")
    return Recipe(
        path=p, title=meta["title"], paper=meta["paper"], input=tuple(meta["input"]),
        classes=meta["classes"], reported_error=meta["reported_error"],
        rule_overrides=meta.get("rule_overrides", {}), note=meta.get("note", ""), body=data,
    )


def find_recipes(folder: Path = RECIPES_DIR) -> list[Recipe]:
    """Every recipe below ``folder``, sorted by path (paper folder, then table and row)."""
    return [load_recipe(p) for p in sorted(folder.rglob("*.toml"))]


def compare_run(recipe: Recipe, run_dir: str | Path) -> str:
    """The paper's test error beside the run's (last epoch), output and local classifiers."""
    run = Path(run_dir)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    if not lines:
        raise ConfigError(f"run {str(run)!r} has no epoch in metrics.jsonl yet")
    last = lines[-1]
    saved = tomllib.loads((run / "config.toml").read_text())
    rule = saved["rule"]["name"]
    paper = recipe.reported_error.get(rule)
    out = []
    differ = mismatches(recipe, saved)
    if differ:
        shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5
                                         else "")
        out.append(f"warning: run {str(run)!r} does not match recipe {str(recipe.path)!r} "
                   f"({shown}): the paper's figures are not its target")
    out.append(f"{recipe.title} ({recipe.paper}), rule {rule}, after epoch {last['epoch']}:")

    def err(acc: float | None) -> str:
        return "-" if acc is None else f"{100 * (1 - acc):.2f}%"

    if isinstance(paper, dict):
        local = last.get("test/acc_local", {})
        for layer, reported in paper.items():
            out.append(f"  {layer:<8} paper {reported:.2f}%   this run {err(local.get(layer))}")
    head = recipe.headline(rule)
    out.append(f"  output   paper {'-' if head is None else f'{head:.2f}%'}   "
               f"this run {err(last['test/acc'])}")
    return "\n".join(out)


def mismatches(recipe: Recipe, run_config: dict[str, Any]) -> list[str]:
    """``section.key: recipe X, run Y`` for every setting in which the run (its config.toml,
    read as a dict) differs from the recipe's column of the run's rule."""
    rule = run_config.get("rule", {}).get("name")
    if rule not in recipe.rules:
        return [f"rule.name: run {rule!r}, recipe {', '.join(recipe.rules)}"]
    want, have = config_to_dict(recipe.config(rule)), config_to_dict(from_dict(run_config))
    return [f"{section}.{key}: recipe {want[section][key]!r}, run {have[section][key]!r}"
            for section, keys in _COMPARED.items()
            for key in (keys or want[section])
            if want[section][key] != have[section][key]]
