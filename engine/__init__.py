"""The model optimization workbench's engine: recipes in, trained and measured models out.

`import engine` stays light: `run`, `resolve` and `registries` (engine.runner) load torch
and the rest when first used. Reading the package top to bottom, its layers are: the
schema (errors, settings, registry, schema, recipe), the parts (data, models, optimizers,
schedules, regularization, uploads, latency, export, executor), training (metrics,
sections, train, stack, ensemble), the techniques (compress, diagnostics, tune, deploy),
the harness (measure), auto-compress (the search over chains), the runner, running
(store, backends, worker, zygote, jobs), and the outputs (plots, report, showcase, cli);
`.importlinter` holds the rule that each imports only from those below.

    import engine
    result = engine.run({"data": {"source": "builtin:digits"}}, on_progress=print)
"""

from __future__ import annotations

import importlib
from typing import Any

from engine.errors import UserError
from engine.recipe import Recipe, load_recipe

__all__ = ["Recipe", "UserError", "load_recipe", "registries", "resolve", "run"]

_LAZY = {"run": "engine.runner", "resolve": "engine.runner", "registries": "engine.runner"}


def __getattr__(name: str) -> Any:
    """`engine.run`, `engine.resolve` and `engine.registries`, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
