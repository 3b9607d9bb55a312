"""The recipe's `tune` section: its settings and search space checked, and sampled
settings applied to a recipe.

`validate_tune` checks a `tune` section and fills its defaults (`DEFAULTS`); a space maps
recipe paths (`train.lr`, `model.hidden`, `compress.0.amount`) to a list of choices or a
range. `apply_params` writes sampled values into a recipe dict; `suggest` draws them from
an Optuna trial (lists and other non-scalar choices travel as JSON text, since Optuna stores
only scalars) and `decode` reads them back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from engine.errors import UserError
from engine.recipe import DataConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("grid", "random", "tpe", "gp", "nsga2")
VALIDATIONS = ("holdout", "kfold", "stratified")
PRUNERS = ("none", "median", "hyperband")
OBJECTIVES = {"val_score": "maximize", "val_loss": "minimize", "params": "minimize",
              "latency_ms": "minimize"}
MULTI_OBJECTIVE_SAMPLERS = ("random", "tpe", "nsga2")
_ALIASES = {"val_accuracy": "val_score", "val_r2": "val_score"}  # DESIGN.md's spelling
_KEYS = ("sampler", "n_trials", "timeout_s", "workers", "validation", "folds", "pruner",
         "space", "objectives", "seed", "study", "cv")
_SECTIONS = {"train": TrainConfig, "model": ModelConfig, "data": DataConfig}
_DEPENDENTS = {"train.optimizer": "train.optimizer_options", "data.source": "data.params"}
# the section's defaults: validate_tune fills them in, the Tune page starts from them
DEFAULTS: dict[str, Any] = {"sampler": "tpe", "n_trials": 20, "workers": 1,
                            "validation": "holdout", "folds": 5, "pruner": "none",
                            "objectives": ("val_score",)}



# what each sampler is called on a page
SAMPLER_LABELS = {"tpe": "Bayesian (TPE)", "gp": "Bayesian (Gaussian process)",
                  "random": "random", "grid": "grid (every combination of the lists)",
                  "nsga2": "NSGA-II (multi-objective)"}
# the dimensions a page offers to search by ticking them: (label, on at first, the values a
# grid tries, the range the other samplers draw from)
PRESETS: dict[str, tuple[str, bool, list[Any], dict[str, Any]]] = {
    "train.lr": ("Learning rate", True, [0.001, 0.01, 0.1],
                 {"low": 1e-4, "high": 0.1, "log": True}),
    "train.weight_decay": ("Weight decay", False, [0.0, 1e-4, 1e-2],
                           {"low": 1e-6, "high": 0.1, "log": True}),
    "model.dropout": ("Dropout", False, [0.0, 0.2, 0.5], {"low": 0.0, "high": 0.5}),
}


# --- the tune section ----------------------------------------------------------------------

def validate_tune(raw: dict[str, Any]) -> dict[str, Any]:
    """The `tune` section checked, with every default filled in (idempotent).

    Raises `UserError` naming the key for anything wrong. The seed stays None when not
    given: `search` then uses the recipe's seed."""
    if not isinstance(raw, dict):
        raise UserError(f"tune must be an object with keys such as sampler, n_trials and "
                        f"space, got {raw!r}.")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise UserError(f"tune.{unknown[0]} is not a tune setting; use one of "
                        f"{', '.join(k for k in _KEYS if k != 'cv')}.")
    sampler = raw.get("sampler", DEFAULTS["sampler"])
    _one_of("tune.sampler", sampler, SAMPLERS)
    validation = raw.get("validation", DEFAULTS["validation"])
    folds = raw.get("folds", DEFAULTS["folds"])
    if raw.get("cv") is not None:  # DESIGN.md's {"cv": {"folds": 5, "stratified": true}}
        cv = raw["cv"]
        if not isinstance(cv, dict) or set(cv) - {"folds", "stratified"}:
            raise UserError('tune.cv must be like {"folds": 5, "stratified": true}; or set '
                            'tune.validation and tune.folds instead.')
        validation = "stratified" if cv.get("stratified", False) else "kfold"
        folds = cv.get("folds", folds)
    _one_of("tune.validation", validation, VALIDATIONS)
    _int_at_least("tune.folds", folds, 2)
    n_trials = raw.get("n_trials", None if sampler == "grid" else DEFAULTS["n_trials"])
    if n_trials is None and sampler != "grid":
        n_trials = DEFAULTS["n_trials"]
    if n_trials is not None:
        _int_at_least("tune.n_trials", n_trials, 1)
    timeout = raw.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not timeout > 0):
        raise UserError(f"tune.timeout_s must be a positive number of seconds or null, "
                        f"got {timeout!r}.")
    workers = raw.get("workers", DEFAULTS["workers"])
    _int_at_least("tune.workers", workers, 1)
    pruner = raw.get("pruner", DEFAULTS["pruner"])
    if pruner is None:
        pruner = "none"
    _one_of("tune.pruner", pruner, PRUNERS)
    objectives = raw.get("objectives", list(DEFAULTS["objectives"]))
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list | tuple) or not objectives:
        raise UserError(f"tune.objectives must be a non-empty list drawn from "
                        f"{', '.join(OBJECTIVES)}, got {objectives!r}.")
    objectives = [_ALIASES.get(o, o) if isinstance(o, str) else o for o in objectives]
    for o in objectives:
        _one_of("tune.objectives", o, tuple(OBJECTIVES))
    if len(set(objectives)) != len(objectives):
        raise UserError("tune.objectives lists an objective twice; list each once.")
    if len(objectives) > 1 and sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise UserError(f"tune.objectives: {len(objectives)} objectives need the sampler "
                        f"nsga2, tpe or random; {sampler} optimizes one objective.")
    if len(objectives) > 1 and pruner != "none":
        raise UserError("tune.pruner must be 'none' with more than one objective: Optuna "
                        "cannot prune multi-objective trials.")
    seed = raw.get("seed")
    if seed is not None:
        _int_at_least("tune.seed", seed, 0)
    study = raw.get("study")
    if study is not None and (not isinstance(study, str) or not study.strip()):
        raise UserError(f"tune.study must be a non-empty name or null, got {study!r}.")
    space = raw.get("space", {})
    if not isinstance(space, dict) or not space:
        raise UserError('tune.space must map recipe paths to values to try, such as '
                        '{"train.lr": {"low": 1e-4, "high": 0.1, "log": true}}.')
    checked = {path: _check_spec(path, spec, sampler) for path, spec in space.items()}
    return {"sampler": sampler, "n_trials": n_trials, "timeout_s": timeout,
            "workers": workers, "validation": validation, "folds": folds, "pruner": pruner,
            "space": checked, "objectives": list(objectives), "seed": seed, "study": study}


def _check_spec(path: Any, spec: Any, sampler: str) -> Any:
    _check_path(path)
    where = f"tune.space[{path!r}]"
    if isinstance(spec, list | tuple):
        if not spec:
            raise UserError(f"{where} is an empty list; give at least one value to try.")
        return list(spec)
    if sampler == "grid":
        raise UserError(f"{where}: the grid sampler needs a list of values for every path, "
                        f"not a range; list the values or pick another sampler.")
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a list of choices or a range "
                        f'{{"low": ..., "high": ...}}, got {spec!r}.')
    extra = sorted(set(spec) - {"low", "high", "log", "step", "type"})
    if extra:
        raise UserError(f"{where}.{extra[0]} is not a range setting; use low, high, log, step "
                        f"and type.")
    low, high = spec.get("low"), spec.get("high")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise UserError(f"{where}.{name} must be a number, got {value!r}.")
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    _one_of(f"{where}.type", kind, ("int", "float"))
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"{where}: an int range needs whole-number low and high.")
    if not low < high:
        raise UserError(f"{where}.low must be below high, got {low!r} and {high!r}.")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log must be true or false, got {log!r}.")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low above 0, got {low!r}.")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
            raise UserError(f"{where}.step must be a positive number or null, got {step!r}.")
        if log:
            raise UserError(f"{where}: step and log cannot be combined; drop one of them.")
        if kind == "int" and not float(step).is_integer():
            raise UserError(f"{where}.step must be a whole number for an int range.")
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
    return {"low": low, "high": high, "log": log, "step": step, "type": kind}


def _check_path(path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise UserError(f"tune.space keys must be recipe paths such as 'train.lr', got "
                        f"{path!r}.")
    parts = path.split(".")
    head = parts[0]
    if head == "compress":
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] == "technique":
            raise UserError(f"tune.space: {path!r} must be compress.N.KEY, the setting KEY "
                            f"of compression step N (from 0), such as 'compress.0.amount'.")
        return
    if head not in _SECTIONS or len(parts) < 2:
        raise UserError(f"tune.space: {path!r} is not a tunable path; use train.KEY, "
                        f"model.KEY, data.KEY or compress.N.KEY.")
    fields = {f.name for f in dataclasses.fields(_SECTIONS[head])}
    if parts[1] not in fields:
        raise UserError(f"tune.space: {path!r} is not a setting of the recipe; {head} has "
                        f"{', '.join(sorted(fields))}.")


def _one_of(path: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise UserError(f"{path} must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def _int_at_least(path: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{path} must be a whole number of at least {low}, got {value!r}.")


# --- applying sampled settings ----------------------------------------------------------------

def apply_params(recipe_dict: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A new recipe dict with each dotted path set ("train.lr", "compress.0.amount");
    the caller checks it with `Recipe.from_dict`. `recipe_dict` is left untouched."""
    out = copy.deepcopy(recipe_dict)
    for path, value in params.items():
        _reset_dependents(out, path, value, params)
        parts = path.split(".")
        node: Any = out
        for i, key in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = int(key)
                if not 0 <= index < len(node):
                    raise UserError(f"tune.space: {path!r} names compression step {index}, "
                                    f"but the recipe has {len(node)}; fix the step number.")
                node = node[index]
            else:
                if node.get(key) is None:  # a section left null: start it from its defaults
                    node[key] = {}
                node = node[key]
            if not isinstance(node, dict | list):
                raise UserError(f"tune.space: {path!r} goes inside "
                                f"{'.'.join(parts[:i + 1])}, which is not a section.")
        node[parts[-1]] = copy.deepcopy(value)
    return out


def _reset_dependents(raw: dict[str, Any], path: str, value: Any,
                      params: dict[str, Any]) -> None:
    """A filled-in recipe holds the settings of its optimizer, schedule and dataset; another
    choice of those must start from its own defaults, not inherit the old one's."""
    if path == "train.schedule.name":
        old = (raw.get("train") or {}).get("schedule")
        if isinstance(old, dict) and old.get("name") != value:
            raw["train"]["schedule"] = {k: v for k, v in old.items()
                                        if k in ("warmup_epochs", "warmup_start")}
        return
    dependent = _DEPENDENTS.get(path)
    if dependent is None or dependent in params:
        return
    section, key = path.split(".")
    part = raw.get(section)
    if isinstance(part, dict) and part.get(key) != value:
        part.pop(dependent.split(".")[1], None)


def _encoded(choices: list[Any]) -> bool:
    """Optuna stores only None, bool, int, float and str; other choices go in as JSON."""
    return any(c is not None and not isinstance(c, bool | int | float | str) for c in choices)


def decode(space: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's stored params as recipe values (lists back from their JSON text)."""
    out = {}
    for path, value in params.items():
        spec = space.get(path)
        if isinstance(spec, list) and _encoded(spec) and isinstance(value, str):
            value = json.loads(value)
        out[path] = value
    return out


def suggest(trial: optuna.trial.Trial, space: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for path, spec in space.items():
        if isinstance(spec, list):
            if _encoded(spec):
                params[path] = json.loads(trial.suggest_categorical(
                    path, [json.dumps(c) for c in spec]))
            else:
                params[path] = trial.suggest_categorical(path, spec)
        elif spec["type"] == "int":
            params[path] = trial.suggest_int(path, spec["low"], spec["high"],
                                             step=spec["step"] or 1, log=spec["log"])
        else:
            params[path] = trial.suggest_float(path, spec["low"], spec["high"],
                                               step=spec["step"], log=spec["log"])
    return params


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    return {path: [json.dumps(c) for c in spec] if _encoded(spec) else list(spec)
            for path, spec in space.items()}


