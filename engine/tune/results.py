"""A finished study as the run's `tuning` result, and the recipe with the winner applied."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from engine.errors import UserError
from engine.recipe import Recipe
from engine.tune.objective import trial_recipe
from engine.tune.space import OBJECTIVES, decode

if TYPE_CHECKING:
    import optuna

# fANOVA's forest needs trials to split on: below this many complete trials the shares are
# noise (8 trials gave exactly 0.5/0.5), so none are computed and the result says why
MIN_TRIALS_FOR_IMPORTANCE = 10


def trial_dict(t: optuna.trial.FrozenTrial, space: dict[str, Any]) -> dict[str, Any]:
    """A finished trial as the result and `on_trial` report it."""
    duration = t.duration.total_seconds() if t.duration is not None else None
    out = {"number": t.number, "params": decode(space, t.params),
           "values": list(t.values) if t.values is not None else None,
           "state": t.state.name, "duration_s": duration}
    if "fold_scores" in t.user_attrs:
        out["fold_scores"] = t.user_attrs["fold_scores"]
        out["folds_trained"] = t.user_attrs.get("folds_trained")
        out["std"] = t.user_attrs.get("std")
    return out


def result(study: optuna.Study, tune: dict[str, Any], name: str) -> dict[str, Any]:
    space = tune["space"]
    objectives = tune["objectives"]
    directions = [OBJECTIVES[o] for o in objectives]
    trials = [trial_dict(t, space) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        raise UserError(f"no trial of study {name!r} completed (all pruned or failed); "
                        f"widen tune.space, add trials or set tune.pruner to 'none'.")
    out: dict[str, Any] = {"study": name, "sampler": tune["sampler"],
                           "validation": tune["validation"], "objectives": objectives,
                           "directions": directions}
    sign = 1.0 if directions[0] == "maximize" else -1.0
    if len(objectives) == 1:
        best = study.best_trial
        out["best_params"] = decode(space, best.params)
        out["best_value"] = best.value
        out["best_number"] = best.number
    else:
        pareto = sorted(study.best_trials, key=lambda t: t.number)
        out["pareto"] = [{"number": t.number, "params": decode(space, t.params),
                          "values": list(t.values)} for t in pareto]
        pick = max(pareto, key=lambda t: sign * t.values[0])  # best on the first objective
        out["best_params"] = decode(space, pick.params)
        out["best_values"] = list(pick.values)
        out["best_number"] = pick.number
    out["trials"] = trials
    out["importances"] = _importances(study, complete) if len(objectives) == 1 else {}
    if not out["importances"]:
        out["importances_note"] = importances_note(len(complete), len(objectives))
    history, best_so_far = [], None
    for t in complete:
        value = t["values"][0]
        if best_so_far is None or sign * value > sign * best_so_far:
            best_so_far = value
        history.append({"number": t["number"], "value": value, "best_so_far": best_so_far})
    out["history"] = history
    return out


def _importances(study: optuna.Study, complete: list[dict[str, Any]]) -> dict[str, float]:
    import optuna

    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    varying = [p for p in complete[0]["params"]
               if len({json.dumps(t["params"].get(p), sort_keys=True) for t in complete}) > 1]
    if len(varying) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(  # fANOVA, seeded: the Tune page's
            study, params=varying,                          # chart draws the same figures
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception:  # importance is a nicety; a degenerate study must not fail the search
        return {}
    return {k: float(v) for k, v in found.items()}


def importances_note(n_complete: int, n_objectives: int) -> str:
    """Why a search has no parameter importances, in one sentence."""
    if n_objectives > 1:
        return ("Parameter importances are computed for one objective; this search has "
                f"{n_objectives}.")
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        return (f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete "
                f"trials to mean something; this search has {n_complete}.")
    return "Parameter importances need at least two parameters that varied between trials."


def ranked_trials(tuning: dict[str, Any]) -> list[dict[str, Any]]:
    """The complete trials as table rows, best first on the first objective: the trial's
    number, each objective's value, then each setting as a readable value."""
    sign = 1.0 if tuning["directions"][0] == "maximize" else -1.0
    done = [t for t in tuning["trials"] if t["state"] == "COMPLETE" and t["values"]]
    rows = []
    for t in sorted(done, key=lambda t: -sign * t["values"][0]):
        row: dict[str, Any] = {"trial": t["number"]}
        row.update(zip(tuning["objectives"], t["values"], strict=False))
        if t.get("std") is not None:
            row["std over folds"] = t["std"]
        row.update({path: readable(value) for path, value in t["params"].items()})
        rows.append(row)
    return rows


def readable(value: Any) -> str:
    """A setting as a person writes it: 0.0123, [64, 32], adam."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return json.dumps(value)
    return str(value)


def winner(tuning: dict[str, Any]) -> str:
    """The best settings as one line: `train.lr = 0.0123 · model.hidden = [64, 32]`."""
    return " · ".join(f"{path} = {readable(v)}" for path, v in tuning["best_params"].items())


def best_recipe(recipe: Recipe, tuning: dict[str, Any]) -> Recipe:
    """The recipe with the best trial's settings applied and no tune section."""
    raw = recipe.to_dict()
    raw["tune"] = None
    return trial_recipe(raw, tuning["best_params"])


