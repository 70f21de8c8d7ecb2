"""One small registry for everything found by name: heads, sources, backbone families.

Rules, the same for every registry:

* a name is taken once; registering another object under a taken name is refused, except by an
  object of the same module and qualified name (a notebook cell run again, a module reloaded),
  which replaces the old one;
* plugins installed by other packages are found through an entry-point group (as pytest and optuna
  plugins are), loaded the first time a name is looked up or listed;
* an unknown name is a user's mistake: the error lists the known names.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

from milcache.errors import MilcacheError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        entry_point_group: str | None = None,
        on_add: Callable[[str, T], None] | None = None,
    ) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.on_add = on_add  # e.g. tell a class the name it is known by
        self._items: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``obj`` available under ``name``."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        old = self._items.get(name)
        if old is not None and old is not obj and _identity(old) != _identity(obj):
            raise MilcacheError(
                f"{self.kind} {name!r} is registered twice: by {_identity(old)} and by {_identity(obj)}"
            )
        if self.on_add is not None:
            self.on_add(name, obj)
        self._items[name] = obj

    def get(self, name: str) -> T:
        self._load_plugins()
        if name not in self._items:
            raise MilcacheError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def _load_plugins(self) -> None:
        """Import each entry point of the group once. A plugin may register itself on import (a
        decorated class in the module the entry point names) or be registered here under the entry
        point's name. A broken plugin is named in a warning and does not stop the others."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for point in entry_points(group=self.entry_point_group):
            try:
                obj = point.load()
            except Exception as exc:  # a plugin's import error is its own; report it, carry on
                warnings.warn(
                    f"{self.kind} plugin {point.name!r} ({point.value}) failed to load: {type(exc).__name__}: {exc}",
                    stacklevel=2,
                )
                continue
            if not isinstance(obj, types.ModuleType) and obj not in self._items.values():
                self.add(point.name, obj)


def _identity(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
