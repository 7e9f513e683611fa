"""One registry type for every named thing prunekit offers: methods, criteria, schedules,
kernels, budgets, models, commands.

    METHODS = Registry("method", packages=("prunekit.oneshot.methods",))

    @METHODS.register(needs="hessian", example="SparseGPT(sparsity=0.5)")
    @dataclass(frozen=True)
    class SparseGPT(OneShotConfig): ...

An entry is the object plus its metadata (what it needs, what it supports, an example). A
registry with `packages` imports every module of those packages the first time it is read,
so a new method is one file with one decorator: no list to edit. The CLI's choices and help,
experiment-file validation and the generated tests all read the registries.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prunekit.errors import PruneError


@dataclass(frozen=True)
class Entry:
    """One registered object: `obj` under `name`, with free-form metadata `meta`."""

    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The first line of the object's docstring (or meta['summary'])."""
        if "summary" in self.meta:
            return str(self.meta["summary"])
        doc = getattr(self.obj, "__doc__", None) or ""
        return doc.strip().split("\n", 1)[0]


class Registry:
    """Named objects of one kind. `kind` names them in errors ("unknown method 'sparsgpt';
    did you mean 'sparsegpt'?"); `packages` are imported in full on first read."""

    def __init__(self, kind: str, packages: Sequence[str] = ()):
        self.kind = kind
        self.packages = tuple(packages)
        self._entries: dict[str, Entry] = {}
        self._loaded = not self.packages

    # -- filling -----------------------------------------------------------------------

    def add(self, name: str, obj: Any, **meta) -> Any:
        """Register `obj` under `name` (lower case); a second object under a taken name is an
        error, the same object again is not (modules may be imported twice in tests)."""
        if not isinstance(name, str) or not name:
            raise PruneError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        key = name.lower()
        old = self._entries.get(key)
        if old is not None and old.obj is not obj and _qualname(old.obj) != _qualname(obj):
            raise PruneError(f"{self.kind} {key!r} is registered twice: {_qualname(old.obj)} "
                             f"and {_qualname(obj)}")
        self._entries[key] = Entry(key, obj, dict(meta))
        return obj

    def register(self, name: str | Callable | None = None, **meta):
        """Decorator: `@REG.register`, `@REG.register("name")` or `@REG.register(key=value)`.

        Without a name, the object's `name` attribute is used (config classes set it), else
        its `__name__` in lower case."""
        if callable(name) and not isinstance(name, str):  # bare @REG.register
            return self.add(_default_name(name), name, **meta)

        def deco(obj):
            return self.add(name or _default_name(obj), obj, **meta)
        return deco

    def remove(self, name: str) -> None:
        """Take an entry out (tests that register a throwaway method clean up with this)."""
        self._entries.pop(name.lower(), None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the imports below register into this object
        for pkg in self.packages:
            module = importlib.import_module(pkg)
            for info in pkgutil.iter_modules(getattr(module, "__path__", []), pkg + "."):
                if not info.name.rsplit(".", 1)[-1].startswith("_"):
                    importlib.import_module(info.name)

    # -- reading -----------------------------------------------------------------------

    def entry(self, name: str) -> Entry:
        self._load()
        if not isinstance(name, str):
            raise PruneError(f"a {self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self._entries[name.strip().lower()]
        except KeyError:
            raise PruneError(self.unknown(name)) from None

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    __getitem__ = get

    def unknown(self, name: str) -> str:
        """The error text for a name that is not registered: close matches first."""
        names = self.names()
        close = difflib.get_close_matches(str(name).lower(), names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(names)})"

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def entries(self) -> list[Entry]:
        self._load()
        return list(self._entries.values())

    def where(self, **meta) -> list[str]:
        """Names whose metadata has every given key=value."""
        return [e.name for e in self.entries()
                if all(e.meta.get(k) == v for k, v in meta.items())]

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name.strip().lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def help(self) -> str:
        """One line per entry, for CLI help texts."""
        return "; ".join(f"{e.name}: {e.summary}" if e.summary else e.name
                         for e in self.entries())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _default_name(obj) -> str:
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return obj.__name__.lower()


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
