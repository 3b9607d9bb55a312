"""The model optimization workbench's engine: recipes in, trained and measured models out.

`import engine` stays light; torch and the rest load when `engine.run` is first used.

    import engine
    result = engine.run({"data": {"source": "builtin:digits"}}, on_progress=print)
"""

from __future__ import annotations

from typing import Any

from engine.errors import UserError
from engine.recipe import Recipe, load_recipe

__all__ = ["Recipe", "UserError", "load_recipe", "registries", "run"]


def run(recipe: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a recipe (a Recipe, a dict or a path); see `engine.runner.run`."""
    from engine.runner import run as _run

    return _run(recipe, **kwargs)


def registries() -> dict[str, Any]:
    """Every registry by its plural name: datasets, models, optimizers, schedules,
    regularizers, compression."""
    from engine.compress import load_all
    from engine.data import DATASETS
    from engine.models import MODELS
    from engine.optimizers import OPTIMIZERS
    from engine.regularization import REGULARIZERS
    from engine.schedules import SCHEDULES

    return {r.kind: r for r in (DATASETS, MODELS, OPTIMIZERS, SCHEDULES, REGULARIZERS,
                                load_all())}
