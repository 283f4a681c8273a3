"""Field types of the config dataclasses, checked at construction: YAML and the command line can hand a field
null, a bool for an int, a string for a list or NaN for a number, which jsonargparse lets through in places
(null for an int field, for one). Each config's __post_init__ calls `check_field_types` first, so a wrong value
ends in one line naming the field instead of a TypeError deep inside training. No dependencies beyond typing."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def describe(tp: Any) -> str:
    """A type annotation in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'values'}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def fits(value: Any, tp: Any) -> bool:
    """Whether `value` is of the annotated type (an int is a number; a bool is neither an int nor a number)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(fits(v, args[0]) for v in value))
    if origin is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(args) and all(map(fits, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))
    return True


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_field_types(obj: Any, section: str) -> None:
    """Refuse, naming `section.field`, a value that is not of its field's type or a NaN/infinite number."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        name = f"{section}.{f.name}" if section else f.name
        if not fits(value, tp):
            raise ValueError(f"{name}={value!r} must be {describe(tp)}; fix it in the recipe or on the command line")
        if _non_finite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
