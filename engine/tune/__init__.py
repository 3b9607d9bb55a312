"""Hyperparameter search on Optuna: the recipe's `tune` section.

`validate_tune` checks a `tune` section and fills its defaults; `search` runs the study it
describes and returns a JSON-friendly result; `best_recipe` is the recipe with the winner's
settings applied ("Train with the best"). Read the parts in this order: `space` (the
section and its search space), `objective` (one trial: holdout or k-fold, then the
compression chain), `study` (sampler, pruner, storage, the search and its workers),
`results`. Optuna is imported inside the functions that use it, so importing the engine
stays fast.
"""

from __future__ import annotations

from engine.tune.objective import fold_indices, trial_recipe
from engine.tune.results import best_recipe, ranked_trials, winner
from engine.tune.space import (
    DEFAULTS,
    MULTI_OBJECTIVE_SAMPLERS,
    OBJECTIVES,
    PRESETS,
    PRUNERS,
    SAMPLER_LABELS,
    SAMPLERS,
    VALIDATIONS,
    apply_params,
    validate_tune,
)
from engine.tune.study import load_study, optuna_storage, run_trials, search

__all__ = ["DEFAULTS", "MULTI_OBJECTIVE_SAMPLERS", "OBJECTIVES", "PRESETS", "PRUNERS",
           "SAMPLERS", "SAMPLER_LABELS", "VALIDATIONS", "apply_params", "best_recipe",
           "fold_indices", "load_study", "optuna_storage", "ranked_trials", "run_trials", "search",
           "trial_recipe", "validate_tune", "winner"]
