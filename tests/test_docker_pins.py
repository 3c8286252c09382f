"""The Docker images' pins (docker/requirements.txt) cover the project's runtime dependencies.

The images install with `pip install --no-index --find-links /wheels -r requirements.txt`, so a
distribution missing from the pins only shows up when an image is built (minutes, gigabytes).
These tests walk the dependency closure instead: pyproject.toml's [project] dependencies, then
the requirements of each installed distribution, recursively, with environment markers and
extras evaluated for the images' Python (CPython 3.11 on x86_64 Linux), and fail on any
distribution that the pins lack. No network, no Docker.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "docker" / "requirements.txt"
PIN_SCRIPT = REPO / "docker" / "pin-requirements.sh"
FIX = "regenerate them with docker/pin-requirements.sh and commit docker/requirements.txt"


def _image_python() -> str:
    """The Python version the pins are resolved for, as docker/pin-requirements.sh sets it."""
    found = re.search(r"^PYTHON_VERSION=(\d+\.\d+)\b", PIN_SCRIPT.read_text(), re.MULTILINE)
    assert found, f"{PIN_SCRIPT.relative_to(REPO)} sets no PYTHON_VERSION=X.Y"
    return found.group(1)


def _image_environment(python: str) -> dict[str, str]:
    """Marker environment of the images: CPython `python` on x86_64 Linux (PEP 508 names)."""
    full = f"{python}.0"
    return {
        "implementation_name": "cpython",
        "implementation_version": full,
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": full,
        "python_version": python,
        "sys_platform": "linux",
    }


def _applies(marker: Marker | None, env: dict[str, str], extras: frozenset[str]) -> bool:
    """Whether a requirement's marker holds in `env` for the base install or a requested extra."""
    if marker is None:
        return True
    return any(marker.evaluate({**env, "extra": extra}) for extra in ("", *sorted(extras)))


def read_pins(path: Path) -> dict[str, Version]:
    """`name==version` lines of a pip requirements file, by canonical name."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"{path.name}:{number}: {line!r} is not an exact pin (name==version); {FIX}"
        )
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}:{number}: {req.name} is pinned twice; {FIX}"
        pins[name] = Version(specs[0].version)
    return pins


def project_requirements() -> list[Requirement]:
    """[project] dependencies from the checkout's pyproject.toml (what the pins are made from).

    Read from the checkout rather than the installed metadata, which an editable install leaves
    stale until it is reinstalled.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def runtime_closure(
    roots: list[Requirement], env: dict[str, str]
) -> tuple[dict[str, list[str]], set[str]]:
    """Every distribution that `roots` need in `env`, each with one chain that requires it.

    Returns (chains by canonical name, names that are needed but not installed here). A
    distribution that is not installed is still returned, but its own requirements are unknown.
    """
    chains: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()  # (name, extra) pairs already expanded; "" = base
    not_installed: set[str] = set()
    # Markers are evaluated when a requirement is queued, with the extras of its requirer.
    queue = deque((req, ["pipelocal"]) for req in roots if _applies(req.marker, env, frozenset()))
    while queue:
        req, parents = queue.popleft()
        name = canonicalize_name(req.name)
        chains.setdefault(name, [*parents, str(req)])
        todo = frozenset({"", *req.extras} - {extra for n, extra in seen if n == name})
        if not todo:
            continue
        seen.update((name, extra) for extra in todo)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            not_installed.add(name)
            continue
        for text in requires:
            child = Requirement(text)
            if _applies(child.marker, env, todo):
                queue.append((child, [*parents, name]))
    return chains, not_installed


def missing_pins(pins: dict[str, Version], env: dict[str, str]) -> list[str]:
    """One line per needed distribution the pins lack: its name and the chain that needs it."""
    chains, _ = runtime_closure(project_requirements(), env)
    return [f"{name} ({' -> '.join(chain)})" for name, chain in sorted(chains.items())
            if name not in pins]


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return _image_environment(_image_python())


def test_pins_cover_the_runtime_dependency_closure(env: dict[str, str]) -> None:
    missing = missing_pins(read_pins(PINS), env)
    assert not missing, (
        f"docker/requirements.txt lacks {len(missing)} distribution(s) that the project needs "
        f"on CPython {env['python_version']} x86_64 Linux, so the images' offline "
        f"`pip install` fails:\n  " + "\n  ".join(missing) + f"\n{FIX}"
    )


def test_pins_satisfy_the_project_requirements(env: dict[str, str]) -> None:
    pins = read_pins(PINS)
    wrong = [
        f"{req.name}=={pins[name]} (pyproject.toml asks {req})"
        for req in project_requirements()
        if _applies(req.marker, env, frozenset())
        and (name := canonicalize_name(req.name)) in pins
        and not req.specifier.contains(pins[name], prereleases=True)
    ]
    assert not wrong, "docker/requirements.txt pins versions pyproject.toml excludes: " + (
        "; ".join(wrong) + f"; {FIX}"
    )


def test_the_closure_is_walked_from_installed_metadata(env: dict[str, str]) -> None:
    """The walk reaches transitive dependencies through the installed metadata."""
    chains, not_installed = runtime_closure(project_requirements(), env)
    assert "torch" not in not_installed, "torch is not installed; pip install -e '.[dev]'"
    # matplotlib -> contourpy: a dependency the project does not name itself.
    assert chains["contourpy"][:2] == ["pipelocal", "matplotlib"], chains["contourpy"]
    # Python 3.10 only: pyproject.toml's tomli requirement is out for the images' 3.11.
    assert "tomli" not in chains


def test_a_pin_file_without_a_dependency_fails_with_its_chain(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Pins of the whole closure except matplotlib and contourpy: exactly those two reported."""
    chains, _ = runtime_closure(project_requirements(), env)
    stale = tmp_path / "requirements.txt"
    stale.write_text("".join(f"{name}==1.0\n" for name in chains
                             if name not in ("matplotlib", "contourpy")))
    missing = missing_pins(read_pins(stale), env)
    assert [line.split(" ")[0] for line in missing] == ["contourpy", "matplotlib"], missing
    assert "pipelocal -> matplotlib -> contourpy" in missing[0], missing


def test_the_walk_follows_extras_and_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Extras asked for on the way are expanded (also on a revisit), other platforms' are not."""
    requires = {
        "a": ["b", "c; extra == 'x'", "d; extra == 'y'", "e; sys_platform == 'win32'"],
        "c": ["a[y]"],  # a cycle that asks for a further extra of a
        "d": [],
    }

    class _Dist:
        def __init__(self, name: str) -> None:
            self.requires = requires[name]

    def distribution(name: str) -> _Dist:
        if name not in requires:
            raise metadata.PackageNotFoundError(name)
        return _Dist(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    roots = [Requirement("a[x]"), Requirement("old; python_version < '3.11'")]
    chains, not_installed = runtime_closure(roots, _image_environment("3.11"))
    assert sorted(chains) == ["a", "b", "c", "d"], chains
    assert chains["d"] == ["pipelocal", "a", "c", "a", "d; extra == \"y\""], chains["d"]
    assert not_installed == {"b"}


def test_markers_follow_the_image_python() -> None:
    """Markers for another Python or platform are out; an extra's are in only if asked."""
    env = _image_environment("3.11")
    assert not _applies(Marker('python_version < "3.11"'), env, frozenset())
    assert _applies(Marker('python_version < "3.11"'), _image_environment("3.10"), frozenset())
    assert not _applies(Marker('sys_platform == "darwin"'), env, frozenset())
    assert not _applies(Marker('extra == "cublas"'), env, frozenset())
    assert _applies(Marker('extra == "cublas"'), env, frozenset({"cublas"}))
