"""One conformance test over every registry (`engine.registries()`), as scikit-learn runs one
over every estimator: each entry says what it is, each parameter's default lies inside its
own bounds and validates, and a recipe that picks the entry with every default resolves."""

from __future__ import annotations

from typing import Any

import pytest

import engine
from engine.registry import Entry, Param
from engine.runner import resolve

ENTRIES = [(kind, entry) for kind, registry in engine.registries().items() for entry in registry]


def _recipe(kind: str, entry: Entry) -> dict[str, Any]:
    """The smallest recipe that picks `entry`, leaving its settings to their defaults."""
    name = entry.name
    if kind == "datasets":
        return {"data": {"source": f"builtin:{name}"}}
    if kind == "models":
        return {"model": {"source": f"builtin:{name}"}}
    if kind == "optimizers":
        return {"train": {"optimizer": name}}
    if kind == "schedules":
        return {"train": {"schedule": {"name": name}}}
    if kind == "compression":
        return {"compress": [{"technique": name}]}
    if kind == "regularizers":
        setting = entry.extra["setting"]
        values = entry.defaults()
        if setting == "early_stopping":
            return {"train": {"early_stopping": values}}
        section, _, key = setting.rpartition(".")
        return {section or "train": {key: values[key]}}
    raise AssertionError(f"a registry the test does not know: {kind}")


def test_every_registry_is_listed_and_has_entries():
    assert set(engine.registries()) == {"datasets", "models", "optimizers", "schedules",
                                        "regularizers", "compression"}
    assert all(len(registry.names()) > 0 for registry in engine.registries().values())


@pytest.mark.parametrize(("kind", "entry"), ENTRIES, ids=[f"{k}-{e.name}" for k, e in ENTRIES])
def test_entry_conforms(kind: str, entry: Entry):
    assert entry.description.strip().endswith((".", ")")), entry.description
    assert len(entry.description) > 20
    names = [p.name for p in entry.params]
    assert len(names) == len(set(names)), f"{entry.name} repeats a parameter"
    for p in entry.params:
        _check_param(entry, p)
    recipe = resolve(_recipe(kind, entry))
    assert resolve(recipe.to_dict()) == recipe  # resolving is idempotent: the dump replays


def _check_param(entry: Entry, p: Param) -> None:
    where = f"{entry.name}.{p.name}"
    assert p.help, f"{where} has no help text"
    assert p.check(p.default, where) == p.default or p.default is None
    if p.default is None:
        return
    if p.low is not None and p.type in ("int", "float"):
        assert p.default >= p.low, where
    if p.high is not None and p.type in ("int", "float"):
        assert p.default <= p.high, where
    if p.choices is not None:
        assert p.default in p.choices, where
    if p.low is not None and p.high is not None:
        assert p.low <= p.high, where
