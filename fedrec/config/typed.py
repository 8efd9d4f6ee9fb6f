"""Build typed config objects (dataclasses) from plain YAML data, rejecting anything unexpected.

Every error names the dotted key, the value and what was expected; unknown keys suggest the
closest valid key. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from fedrec.errors import ConfigError

T = TypeVar("T")
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what torch, numpy and SQLite can hold

# Exponent floats without a dot ("1e-7", "5E3"), which YAML 1.1 resolvers leave as strings.
_YAML11_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _RangeError(ConfigError):
    """A number of the right type out of any usable range (infinite, NaN, beyond 64 bits)."""


def unknown_key_error(path: str, key: str, known: typing.Iterable[str]) -> ConfigError:
    """Error for an unknown key, with the closest known key as a hint."""
    known = sorted(known)
    dotted = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint} (known keys here: {', '.join(known)})")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"config key '{path}' = {value!r}: expected {_describe(tp)}")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise _fail(path, value, tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return coerce(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        # A mapping for an optional section: the section's own error (unknown key, failed validate)
        # says more than "expected a mapping or null".
        for arg, section_error in zip(get_args(tp), errors):
            if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                raise section_error
            if arg in (int, float) and isinstance(section_error, _RangeError):
                raise section_error  # "expected a finite number" says more than "float or null"
        raise _fail(path, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _fail(path, value, tp)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _fail(path, value, tp)
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, value, tp)
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {coerce(k, key_tp, path): coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _fail(path, value, tp)
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                raise _RangeError(
                    f"config key '{path}' = {value!r}: expected an integer that fits in 64 bits"
                )
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise _fail(path, value, tp)
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
        elif isinstance(value, str) and _YAML11_EXPONENT.match(value):
            number = float(value)  # PyYAML (YAML 1.1) reads 1e-7 as a string; it is a float here
        if number is None:
            raise _fail(path, value, tp)
        if not math.isfinite(number):
            # 1e309 parses as inf: no setting of this project means infinity or NaN.
            raise _RangeError(f"config key '{path}' = {value!r}: expected a finite number (got {number})")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, value, tp)
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def build(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Construct dataclass ``cls`` from ``data``; unknown keys and wrong types are errors.

    After construction, a ``validate(path)`` method on the dataclass (if any) checks cross-field
    consistency.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path or '<root>'}' = {data!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise unknown_key_error(path, str(key), fields)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(value, hints[name], f"{path}.{name}" if path else name)
    for name, field in fields.items():
        if name in kwargs:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{path + '.' if path else ''}{name}' is required")
        if dataclasses.is_dataclass(hints[name]) and field.default_factory is not dataclasses.MISSING:
            # Nested sections left out still get validated defaults.
            kwargs[name] = build(hints[name], {}, f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config object (for summary.json and checkpoints)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
