"""The installed package, not the checkout: a wheel in a fresh virtual environment outside the
repository lists every recipe with its figures (recipes are package data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelocal.recipes import find_recipes
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_lists_every_recipe_from_outside_the_checkout(tmp_path: Path) -> None:
    def run(*cmd: str, cwd: Path = tmp_path) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "pipelocal", src / "pipelocal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "dist"), str(src))
    [wheel] = (tmp_path / "dist").glob("pipelocal-*.whl")
    # The dependencies (torch, ...) come from this interpreter; pipelocal only from the wheel.
    run(sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv"))
    python = tmp_path / "venv" / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel))
    where = run(str(python), "-c", "import pipelocal; print(pipelocal.__file__)")
    assert str(tmp_path / "venv") in where and str(REPO) not in where
    out = run(str(tmp_path / "venv" / "bin" / "pipelocal"), "recipes")
    expected = find_recipes()
    assert len(expected) == 131
    for recipe in expected:
        assert recipe.title in out, recipe.title
    assert "predsim 3.97%" in out  # Nøkland & Eidnes, table 4, VGG11B(3x) CIFAR-10
    assert "auglocal 6.92%" in out  # Ma et al., table 1, ResNet-32 AugLocal d = 4 CIFAR-10
