"""A name -> factory registry, used for rules, models and datasets alike.

Every registry is also indexed by its kind, so that the config (which sits below the packages
that fill the registries) can list a kind's names, ``Registry.of(kind).names()``, without importing
them. ``pipelocal/__init__.py`` imports those packages, so the registries are full before any
config is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")

_BY_KIND: dict[str, Registry] = {}


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """``@REG.register("name")`` decorates a factory; ``REG.get(name)`` fails naming the choices."""

    def __init__(self, kind: str) -> None:
        if kind in _BY_KIND:
            raise ValueError(f"a registry of {kind}s exists already")
        self.kind = kind
        self._items: dict[str, T] = {}
        _BY_KIND[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted: the one listing the CLI, the docs and the tests use."""
        return sorted(self._items)

    @staticmethod
    def of(kind: str) -> Registry:
        """The registry of ``kind`` ("rule", "model", "dataset")."""
        try:
            return _BY_KIND[kind]
        except KeyError:
            raise RuntimeError(
                f"no registry of {kind}s: import pipelocal (its __init__ imports the packages "
                "that fill the registries) before building a config"
            ) from None
