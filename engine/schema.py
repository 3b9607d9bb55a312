"""Frozen dataclasses from JSON-like dicts and back, with messages that name the key.

The recipe's sections are plain frozen dataclasses; this module turns a dict into them
(`build`: unknown keys refused with the nearest valid one, types converted and checked,
each section's own `validate()` called) and back (`dump`: lists for tuples). A section
whose class sets `FLAT = "options"` keeps the settings it does not name in that dict
field, written flat in JSON (a schedule's `{"name": "step", "gamma": 0.5}`).
Nothing here knows a registry: names of techniques are checked by `engine.runner.resolve`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from engine.errors import UserError
from engine.registry import unknown_message


def build(cls: type, raw: Any, where: str) -> Any:
    """An instance of the dataclass `cls` from `raw`, checked; `where` prefixes messages."""
    label = where or "the recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{label} must be an object with keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    flat = getattr(cls, "FLAT", None)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names or key == flat:
            if flat is not None:
                extra[key] = value
                continue
            raise UserError(unknown_message("key", path, names))
        kwargs[key] = convert(hints[key], value, path)
    if flat is not None:
        kwargs[flat] = extra
    for f in dataclasses.fields(cls):  # sections left out are built (and checked) from {}
        if f.name not in kwargs and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                kwargs[f.name] = build(type(default), {}, f"{where}.{f.name}".lstrip("."))
    obj = cls(**kwargs)
    obj.validate()
    return obj


def convert(hint: Any, value: Any, path: str) -> Any:
    """`value` as the type `hint` says (a section, a tuple, a number), or a UserError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if dataclasses.is_dataclass(arg):
                return build(arg, value, path)
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return convert(arg, value, path)
            except UserError:
                continue
        names = " or ".join(_type_name(a) for a in options)
        raise UserError(f"{path} must be {names}, got {value!r}.")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path} must be a list, got {value!r}.")
        inner = args[0]
        return tuple(convert(inner, v, f"{path}[{i}]") if inner is not Any else v
                     for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path} must be an object with keys, got {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise UserError(f"{path} must be a number, got {value!r}.")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise UserError(f"{path} must be {_type_name(hint)}, got {value!r}.")
    return value


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def dump(obj: Any) -> Any:
    """A dataclass tree as plain JSON data: lists for tuples, flat options inlined."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        flat = getattr(type(obj), "FLAT", None)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == flat:
                out.update(dump(value))
            else:
                out[f.name] = dump(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj


def choice(path: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Refuse `value` unless it is one of `allowed` (True is not 1 here)."""
    if value not in allowed or (isinstance(value, bool) != any(
            isinstance(a, bool) and a == value for a in allowed)):
        shown = ", ".join(json.dumps(a) for a in allowed)
        raise UserError(f"{path} must be one of {shown}; got {json.dumps(value)}.")


def at_least(path: str, value: Any, low: float) -> None:
    if value < low:
        raise UserError(f"{path} must be at least {low}, got {value!r}.")


def int_list(text: str, what: str) -> list[int]:
    """'128, 64' -> [128, 64]; a bad list is a UserError naming the field."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what} must be whole numbers separated by commas, such as "
                        f"'128, 64'.") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} needs at least one positive width, such as '128, 64'.")
    return values


def json_list(text: str, box: str, example: str) -> list[Any]:
    """The JSON list typed into the box labelled `box`, or a UserError naming that box."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value:
        raise UserError(f"The box {box!r} needs a JSON list such as {example}; "
                        f"{text.strip()[:40]!r} is not one yet.")
    return value
