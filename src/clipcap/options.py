"""Option dataclasses: one source for every option, its type, default, help text and allowed values.

Each command's options are one dataclass whose fields are declared with `option(...)`. The library validates an
instance with `check_options` (types and ranges, one `ClipCapError` naming the field); the command line
(`clipcap.cli.arguments`) is generated from the same fields, so a default or a help text is written once.
Help texts and errors describe values and name fields in backticks (`batch_size`); they never spell command-line flags,
which the application layer derives from the field names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from .errors import ClipCapError


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    positional: bool = False,
    flag: str | None = None,
    negate: str | None = None,
    pair: tuple[str, str] | None = None,
    pair_help: tuple[str, str] | None = None,
    default_text: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help text and constraints.

    `choices` / `min` / `max` constrain the value (bounds inclusive, from `clipcap.limits` where they protect the
    machine; `max` is shown in the help); `positional` makes it a positional argument on the command line; `flag`
    renames its flag; `negate` gives a True-by-default boolean its turning-off flag (e.g. "no-spice"); `pair` gives a
    None/True/False boolean its two flags (e.g. ("tune-lm", "frozen-lm")); `default_text` says what a None default
    means; `cli=False` keeps a field out of the command line (set by the application itself)."""
    metadata = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "positional": positional,
        "flag": flag,
        "negate": negate,
        "pair": pair,
        "pair_help": pair_help,
        "default_text": default_text,
        "metavar": metavar,
        "cli": cli,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of an option dataclass."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def check_options(obj: Any) -> None:
    """Raise ClipCapError naming the first field whose value has the wrong type, is an empty list, is outside its
    bounds or is not among its choices."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp, optional = unwrap_optional(hints[f.name])
        if value is None:
            if optional:
                continue
            raise ClipCapError(f"`{f.name}` must be set")
        if not _type_ok(value, tp):
            name = getattr(tp, "__name__", str(tp))
            raise ClipCapError(f"`{f.name}` must be {name}, got {value!r}")
        if tp is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))
        if isinstance(value, list) and not value:
            # A list option left unset is None or its default; an empty one ("--styles ''") names nothing to do.
            raise ClipCapError(f"`{f.name}` must name at least one value, got []")
        meta = f.metadata
        values = value if isinstance(value, (list, tuple)) else [value]
        if meta.get("choices") is not None:
            bad = [v for v in values if v not in meta["choices"]]
            if bad:
                raise ClipCapError(f"`{f.name}` must be one of {', '.join(map(str, meta['choices']))}, got {bad[0]!r}")
        if meta.get("min") is not None:
            low = [v for v in values if v < meta["min"]]
            if low:
                raise ClipCapError(f"`{f.name}` must be at least {meta['min']:g}, got {low[0]!r}")
        if meta.get("max") is not None:
            high = [v for v in values if v > meta["max"]]
            if high:
                raise ClipCapError(f"`{f.name}` must be at most {meta['max']:g}, got {high[0]!r}")
