"""Tests for pipelocal.registry, and for the one-way import order it makes possible."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelocal import registry
from pipelocal.registry import Registry, UnknownNameError

PACKAGE = Path(__file__).resolve().parents[1] / "pipelocal"

# Bottom to top. A module may import from its own layer and the layers below, never above.
_LAYERS = [
    {"registry", "checkpoint", "metrics", "plot", "cuda_ops", "stop", "microbatch", "hostmem"},
    {"config"},
    {"data", "models", "device", "determinism", "meters", "recipes", "optim"},
    {"rules", "runspec"},
    {"engine", "trainer"},
    {"pipeline"},
    {"launch", "exits"},
    {"cli", "__main__"},
]
_LAYER = {name: i for i, names in enumerate(_LAYERS) for name in names}


def _top(module: str) -> str:
    """pipelocal.data.loader -> data."""
    return module.split(".")[1]


def _pipelocal_imports(path: Path) -> list[str]:
    """Every pipelocal module ``path`` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipelocal":  # from pipelocal import data
                out += [f"pipelocal.{alias.name}" for alias in node.names]
            elif node.module.startswith("pipelocal."):
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("pipelocal.")]
    return out


def test_registry_of_each_kind() -> None:
    assert "predsim" in Registry.of("rule").names()
    assert "vgg8b" in Registry.of("model").names()
    assert "digits" in Registry.of("dataset").names()
    with pytest.raises(RuntimeError, match="no registry of widgets"):
        Registry.of("widget")


def test_a_kind_has_one_registry() -> None:
    with pytest.raises(ValueError, match="a registry of rules exists already"):
        Registry("rule")


def test_unknown_name_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_BY_KIND", dict(registry._BY_KIND))  # leave no test kind
    reg: Registry[int] = Registry("test-thing")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1 and Registry.of("test-thing").names() == ["a", "b"]
    with pytest.raises(UnknownNameError, match="unknown test-thing 'c'; available: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(3)


def test_imports_go_one_way() -> None:
    """Config and registries at the bottom, then data/models/rules, engine, pipeline,
    launchers, CLI: no module imports from a layer above its own (lazy imports included)."""
    modules = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    assert len(modules) > 40
    upward = []
    for path in modules:
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _LAYER[_top(".".join(rel.parts))]
        for target in _pipelocal_imports(path):
            if _LAYER[_top(target)] > own:
                upward.append(f"{rel} imports {target}")
    assert upward == []
