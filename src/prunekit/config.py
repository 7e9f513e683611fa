"""Configs: frozen dataclasses checked when they are built, and the one path from text
(command line, TOML experiment files) to a config.

A config class is `@dataclass(frozen=True)` over `Config`. When an instance is built, every
field is checked against its annotation (an int field refuses "64" and 2.5, a bool field
refuses "no", a tuple-of-globs field refuses a bare string), then the class's own `check()`
runs. A field may also name a parser in the class's `field_parsers` (text to an object, e.g.
a pattern or a grid): it runs after the type check, may return the value's canonical form,
and any PruneError it raises is prefixed with the class and field. A bad value raises
PruneError naming the class and the field, before any work starts.

`to_dict()` gives plain values plus a type tag; `from_dict(d, registry)` builds the config
back (strict types, as from TOML); `parse_value(field, "text")` turns command-line text into
a field's type. Both the CLI and experiment files go through `build()`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args, get_origin

from prunekit.errors import PruneError

_NONE = type(None)


class Config:
    """Base of every frozen config. Subclasses are `@dataclass(frozen=True)` and may define
    `check(self)` for rules across fields (raise PruneError naming the field)."""

    #: the type tag written by to_dict (registry name); set by the subclass or the registry
    name: ClassVar[str] = ""
    #: field name -> parser(value) returning the value to keep (its canonical form, or the
    #: value itself); merged over the class's bases, a subclass's entry wins
    field_parsers: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self):
        hints = _hints(type(self))
        parsers = _parsers(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            where = f"{type(self).__name__}.{f.name}"
            value = getattr(self, f.name)
            fixed = coerce(hints.get(f.name, Any), value, where)
            if f.name in parsers and fixed is not None:
                try:
                    fixed = parsers[f.name](fixed)
                except PruneError as e:
                    raise PruneError(f"{where}: {e}") from None
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)
        self.check()

    def check(self) -> None:
        """Rules across fields; the per-field type checks have already passed."""

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def options(self) -> dict:
        """Every init field as a plain value (reports, experiment rows)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_dict(self) -> dict:
        """{'type': tag, field: value, ...}, with tuples as lists: TOML/JSON ready."""
        out = {"type": self.name or type(self).__name__.lower()}
        for k, v in self.options().items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def from_dict(d: Mapping, registry=None, cls=None):
    """Build a config from plain values (a TOML table, JSON, to_dict's output).

    The class comes from `cls`, or from d['type'] looked up in `registry`. Values must
    already have their types (no text parsing): TOML's `blocksize = "64"` is an error."""
    d = dict(d)
    tag = d.pop("type", None)
    if cls is None:
        if registry is None or tag is None:
            raise PruneError("a config dict needs a 'type' naming what it configures")
        cls = registry.get(tag)
    return build(cls, d, text=False)


def build(cls, values: Mapping[str, Any], *, text: bool, where: str | None = None):
    """cls(**values), naming unknown keys; with text=True, string values are parsed to the
    field types first (command-line `-o key=value`)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        k = str(key).strip().replace("-", "_")
        if k not in fields:
            raise PruneError(f"{where or cls.__name__}: unknown option {key!r}; options are: "
                             f"{', '.join(fields)}")
        if text and isinstance(value, str):
            value = parse_value(hints.get(k, Any), value, f"{cls.__name__}.{k}")
        kwargs[k] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise PruneError(f"{where or cls.__name__}: {e}") from e


def parse_value(tp, text: str, where: str):
    """Command-line text to a value of type `tp` (then checked by coerce)."""
    s = text.strip()
    origin, args = get_origin(tp), get_args(tp)
    if _is_optional(tp):
        if s.lower() in ("none", "null", ""):
            return None
        return parse_value(_strip_none(tp), text, where)
    if tp is bool:
        low = s.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise PruneError(f"{where} takes true or false, got {text!r}")
    if tp is int:
        try:
            return int(s)
        except ValueError:
            raise PruneError(f"{where} takes an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(s)
        except ValueError:
            raise PruneError(f"{where} takes a number, got {text!r}") from None
    if origin is tuple:
        inner = args[0] if args else str
        return tuple(parse_value(inner, t, where) for t in s.split(",") if t.strip())
    if origin in (dict, Mapping) or tp is dict:
        out = {}
        for item in (t for t in s.split(",") if t.strip()):
            k, sep, v = item.partition(":")
            if not sep:
                raise PruneError(f"{where} takes key:value pairs separated by commas, got "
                                 f"{text!r}")
            out[k.strip()] = parse_value(args[1] if len(args) == 2 else str, v, where)
        return out
    if _is_union(tp):  # e.g. float | str: the first that parses
        for a in get_args(tp):
            try:
                return parse_value(a, text, where)
            except PruneError:
                continue
    return s


def coerce(tp, value, where: str):
    """Check `value` against annotation `tp`; return it (or its canonical form: int to float
    for a float field, list to tuple for a tuple field). Raise PruneError naming `where`."""
    if tp is Any or tp is object:
        return value
    if _is_optional(tp):
        return None if value is None else coerce(_strip_none(tp), value, where)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value not in args:
            raise PruneError(f"{where} must be one of {', '.join(repr(a) for a in args)}, "
                             f"got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PruneError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PruneError(f"{where} must be an integer, got {value!r}")
        if not -2**63 <= value < 2**63:  # torch and numpy take 64-bit integers
            raise PruneError(f"{where} must fit in 64 bits, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PruneError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise PruneError(f"{where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PruneError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise PruneError(f"{where} takes a list, got {value!r}")
        inner = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            out = tuple(coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
        else:
            if len(value) != len(args):
                raise PruneError(f"{where} takes {len(args)} values, got {len(value)}")
            out = tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in
                        enumerate(zip(args, value)))
        return out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise PruneError(f"{where} takes a table of key = value, got {value!r}")
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {coerce(kt, k, f"{where} key"): coerce(vt, v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if _is_union(tp):
        errors = []
        for a in get_args(tp):
            try:
                return coerce(a, value, where)
            except PruneError as e:
                errors.append(str(e))
        raise PruneError(f"{where}: {value!r} fits none of {tp}")
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise PruneError(f"{where} must be a {tp.__name__}, got {value!r}")
        return value
    return value


def _hints(cls) -> dict:
    cached = cls.__dict__.get("_prunekit_hints")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "_prunekit_hints", cached)  # noqa: B010 (class attribute, not a field)
    return cached


def _parsers(cls) -> dict:
    cached = cls.__dict__.get("_prunekit_parsers")
    if cached is None:
        cached = {}
        for klass in reversed(cls.__mro__):
            cached.update(klass.__dict__.get("field_parsers", {}))
        setattr(cls, "_prunekit_parsers", cached)  # noqa: B010 (class attribute, not a field)
    return cached


def _is_union(tp) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _is_optional(tp) -> bool:
    return _is_union(tp) and _NONE in get_args(tp)


def _strip_none(tp):
    args = tuple(a for a in get_args(tp) if a is not _NONE)
    if len(args) == 1:
        return args[0]
    return typing.Union[args]  # noqa: UP007


def positive(obj, *names: str, strict: bool = True) -> None:
    """Raise naming the field unless each named field is > 0 (>= 0 with strict=False)."""
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        if (v <= 0) if strict else (v < 0):
            raise PruneError(f"{type(obj).__name__}.{n} must be {'>' if strict else '>='} 0, "
                             f"got {v!r}")
