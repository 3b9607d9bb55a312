"""Registries: every technique the user can pick, under a stable name.

Each entry has a description and typed parameters (name, type, default, range). The CLI's
`list`, the recipe validation and the app's menus are all built from these, so adding a
technique never touches a page.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.errors import UserError


@dataclass(frozen=True)
class Param:
    """One parameter of a registered technique."""

    name: str
    type: str  # "int", "float", "bool", "str", "list[int]", "list[float]", "dict"
    default: Any
    help: str = ""
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False  # a log scale suits this number (learning rates, decay strengths)
    when: tuple[str, tuple[Any, ...]] | None = None  # (other param, its values) under which
    #   this one does anything: the app shows it only then (quantize's bits for k-bit methods)

    def applies(self, values: dict[str, Any]) -> bool:
        """Whether this parameter does anything given the other parameters' `values`."""
        if self.when is None:
            return True
        other, allowed = self.when
        return values.get(other) in allowed

    def check(self, value: Any, where: str) -> Any:
        """Return `value` coerced to this parameter's type, or raise a UserError naming it."""
        if value is None and self.default is None:
            return None
        ok_types = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                    "list[int]": (list, tuple), "list[float]": (list, tuple),
                    "dict": (dict,)}[self.type]
        if isinstance(value, bool) and self.type in ("int", "float"):
            ok_types = ()
        if not isinstance(value, ok_types):
            raise UserError(f"{where} must be of type {self.type}, got {value!r}.")
        if self.type == "float":
            value = float(value)
        if self.type == "list[int]":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise UserError(f"{where} must be a list of positive integers, got {value!r}.")
            value = list(value)
        if self.type == "list[float]":
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise UserError(f"{where} must be a list of numbers, got {value!r}.")
            value = [float(v) for v in value]
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, self.choices))}; "
                            f"got {value!r}.")
        if self.low is not None and value < self.low:
            raise UserError(f"{where} must be at least {self.low}, got {value!r}.")
        if self.high is not None and value > self.high:
            raise UserError(f"{where} must be at most {self.high}, got {value!r}.")
        return value

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "type": self.type, "default": self.default, "help": self.help}
        for key in ("low", "high", "choices"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key)) if key == "choices" else getattr(self, key)
        if self.log:
            d["log"] = True
        if self.when is not None:
            d["when"] = {self.when[0]: list(self.when[1])}
        return d


@dataclass(frozen=True)
class Entry:
    """A registered technique: its stable name, what it does, its parameters, its code."""

    name: str
    description: str
    params: tuple[Param, ...]
    fn: Callable[..., Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """Fill defaults into `options` and check every value; unknown names are refused."""
        known = {p.name for p in self.params}
        for key in options:
            if key not in known:
                raise UserError(unknown_message("setting", f"{where}.{key}", known,
                                                f"for {self.name}"))
        return {p.name: p.check(options.get(p.name, p.default), f"{where}.{p.name}")
                for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "params": [p.to_dict() for p in self.params], **self.extra}


class Registry:
    """Name -> Entry for one family (datasets, models, optimizers, ...)."""

    def __init__(self, kind: str, noun: str, description: str) -> None:
        self.kind = kind  # plural, as listed: "optimizers"
        self.noun = noun  # singular, as in messages: "optimizer"
        self.description = description
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str, params: tuple[Param, ...] = (),
                 **extra: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, description, tuple(params), fn, dict(extra))
            return fn
        return wrap

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(unknown_message(self.noun, name, self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description,
                "entries": [e.to_dict() for e in self]}


def unknown_message(what: str, name: str, known: Any, context: str = "") -> str:
    """'unknown X 'y'; did you mean 'z'? Known: ...' in one sentence."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name).rsplit(".", 1)[-1], known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    ctx = f" {context}" if context else ""
    return f"unknown {what} {name!r}{ctx}; {hint}choose one of: {', '.join(known) or '(none)'}."
