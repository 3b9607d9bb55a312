"""Hyperparameter search on Optuna: the recipe's `tune` section.

`validate_tune` checks a `tune` section and fills its defaults; `search` runs the study it
describes and returns a JSON-friendly result; `best_recipe` is the recipe with the winner's
settings applied ("Train with the best").

Each trial trains a fresh model of the recipe with the sampled settings (`apply_params`)
and scores it on data the training never saw:

- `holdout`: train on the training part, score on the validation part. The validation
  score is reported after every epoch, so a pruner can stop a hopeless trial early.
- `kfold` / `stratified`: the training and validation parts are pooled and cut into
  `folds` disjoint validation folds; one fresh model per fold is trained on the other
  folds. The score is the mean over folds (the std is kept with the trial); the running
  mean is reported after each fold. The preprocessing is not refitted per fold: the bundle
  was already scaled on the training part by `load_data`, so the scaler saw the pooled
  training rows but never the test part. That small, shared leak affects every trial
  alike and does not change which settings win. The fold's validation rows also drive
  early stopping, as the validation part does in a holdout run.

With a compression chain in the recipe, a trial runs the chain after training and scores
the last step's model, so `compress.N.KEY` settings can be tuned too.

Trials live in an Optuna RDB storage, by default the run store's database (Optuna keeps
its own tables there). A study with the same name resumes, and trials already finished
count toward `n_trials`. With `workers` > 1, that many processes (spawned) share the
study through the storage; the parent polls it to report trials as they finish.

Optuna is imported inside the functions so that `import engine` stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import UserError
from engine.recipe import DataConfig, ModelConfig, Recipe, TrainConfig

if TYPE_CHECKING:
    import optuna

    from engine.data import DataBundle

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
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")
POLL_S = 0.5  # how often the parent of worker processes looks for finished trials


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
    sampler = raw.get("sampler", "tpe")
    _one_of("tune.sampler", sampler, SAMPLERS)
    validation = raw.get("validation", "holdout")
    folds = raw.get("folds", 5)
    if raw.get("cv") is not None:  # DESIGN.md's {"cv": {"folds": 5, "stratified": true}}
        cv = raw["cv"]
        if not isinstance(cv, dict) or set(cv) - {"folds", "stratified"}:
            raise UserError('tune.cv must be like {"folds": 5, "stratified": true}; or set '
                            'tune.validation and tune.folds instead.')
        validation = "stratified" if cv.get("stratified", False) else "kfold"
        folds = cv.get("folds", folds)
    _one_of("tune.validation", validation, VALIDATIONS)
    _int_at_least("tune.folds", folds, 2)
    n_trials = raw.get("n_trials", None if sampler == "grid" else 20)
    if n_trials is None and sampler != "grid":
        n_trials = 20
    if n_trials is not None:
        _int_at_least("tune.n_trials", n_trials, 1)
    timeout = raw.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not timeout > 0):
        raise UserError(f"tune.timeout_s must be a positive number of seconds or null, "
                        f"got {timeout!r}.")
    workers = raw.get("workers", 1)
    _int_at_least("tune.workers", workers, 1)
    pruner = raw.get("pruner", "none")
    if pruner is None:
        pruner = "none"
    _one_of("tune.pruner", pruner, PRUNERS)
    objectives = raw.get("objectives", ["val_score"])
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


def _trial_recipe(base: dict[str, Any], params: dict[str, Any]) -> Recipe:
    raw = apply_params(base, params)
    raw["tune"] = None
    return Recipe.from_dict(raw)


def _encoded(choices: list[Any]) -> bool:
    """Optuna stores only None, bool, int, float and str; other choices go in as JSON."""
    return any(c is not None and not isinstance(c, bool | int | float | str) for c in choices)


def _decode(space: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's stored params as recipe values (lists back from their JSON text)."""
    out = {}
    for path, value in params.items():
        spec = space.get(path)
        if isinstance(spec, list) and _encoded(spec) and isinstance(value, str):
            value = json.loads(value)
        out[path] = value
    return out


def _suggest(trial: optuna.trial.Trial, space: dict[str, Any]) -> dict[str, Any]:
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


def _grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    return {path: [json.dumps(c) for c in spec] if _encoded(spec) else list(spec)
            for path, spec in space.items()}


def _probe(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Refuse a bad value before any trial runs: every choice and both ends of every range
    must make a valid recipe."""
    for path, spec in space.items():
        values = spec if isinstance(spec, list) else [spec["low"], spec["high"]]
        for value in values:
            try:
                _trial_recipe(base, {path: value})
            except UserError as exc:
                raise UserError(f"tune.space[{path!r}] value {value!r} makes a bad recipe: "
                                f"{exc}") from None


# --- validation folds and one trial ------------------------------------------------------------

def fold_indices(y: np.ndarray, validation: str, folds: int, *, seed: int, task: str
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index pairs into `y` (the pooled training and validation rows): the
    validation folds are disjoint and cover every row once."""
    from engine.data import kfold, stratified_kfold

    if validation == "stratified":
        if task != "classification":
            raise UserError("tune.validation 'stratified' needs a classification task; use "
                            "'kfold' for regression.")
        return list(stratified_kfold(y, folds, seed=seed))
    return list(kfold(len(y), folds, seed=seed))


@dataclasses.dataclass
class _Context:
    """What every trial of one process shares: the recipe, the data, the device."""

    recipe: Recipe
    tune: dict[str, Any]
    base: dict[str, Any]  # the recipe as a dict, without its tune section
    device: Any
    seed: int
    data_cache: dict[str, DataBundle] = dataclasses.field(default_factory=dict)

    def data(self, recipe: Recipe) -> DataBundle:
        """Loaded once per search (again only when the trial changes data settings)."""
        from engine.data import load_data

        key = json.dumps(dataclasses.asdict(recipe.data), sort_keys=True, default=str)
        if key not in self.data_cache:
            if len(self.data_cache) >= 4:
                self.data_cache.pop(next(iter(self.data_cache)))
            self.data_cache[key] = load_data(recipe.data, seed=recipe.seed)
        return self.data_cache[key]


def _objective(trial: optuna.trial.Trial, ctx: _Context) -> float | list[float]:
    import optuna

    tune = ctx.tune
    params = _suggest(trial, tune["space"])
    recipe = _trial_recipe(ctx.base, params)
    data = ctx.data(recipe)
    objectives = tune["objectives"]
    single = len(objectives) == 1
    report = single and objectives[0] in ("val_score", "val_loss") and tune["pruner"] != "none"
    key = "score" if objectives[0] == "val_score" else "loss"

    def on_epoch(event: dict[str, Any]) -> None:
        value = event.get("val_accuracy", event.get("val_r2")) if key == "score" \
            else event.get("val_loss")
        if value is not None and math.isfinite(value):
            trial.report(float(value), event["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {event['epoch']}")

    if tune["validation"] == "holdout":
        if len(data.y_val) == 0:
            raise UserError("tune.validation 'holdout' needs a validation part; set "
                            "data.val_fraction above 0 or use 'kfold'.")
        fits = [_fit_and_score(recipe, data, ctx, on_epoch if report else None)]
    else:
        pool_X = np.concatenate([data.X_train, data.X_val])
        pool_y = np.concatenate([data.y_train, data.y_val])
        fits = []
        splits = fold_indices(pool_y, tune["validation"], tune["folds"], seed=ctx.seed,
                              task=data.task)
        if not report and not recipe.compress:  # no fold-by-fold pruning: batch the folds
            fits = _folds_together(recipe, data, pool_X, pool_y, splits, ctx)
        batched = bool(fits)
        for i, (tr, va) in enumerate(splits if not fits else []):
            part = dataclasses.replace(data, X_train=pool_X[tr], y_train=pool_y[tr],
                                       X_val=pool_X[va], y_val=pool_y[va])
            fits.append(_fit_and_score(recipe, part, ctx, None, measure=i == 0))
            if report:
                trial.report(float(np.mean([f[key] for f in fits])), i + 1)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {i + 1}")
        scores = [f["score"] for f in fits]
        trial.set_user_attr("folds_trained", "batched" if batched else "one after another")
        trial.set_user_attr("fold_scores", scores)
        trial.set_user_attr("fold_losses", [f["loss"] for f in fits])
        trial.set_user_attr("std", float(np.std(scores)))
    values = []
    for name in objectives:
        if name == "val_score":
            values.append(float(np.mean([f["score"] for f in fits])))
        elif name == "val_loss":
            values.append(float(np.mean([f["loss"] for f in fits])))
        else:
            values.append(float(fits[0][name]))
    trial.set_user_attr("recipe_params", params)
    return values[0] if single else values


def _fit_and_score(recipe: Recipe, data: DataBundle, ctx: _Context,
                   on_progress: Callable[[dict[str, Any]], None] | None, *,
                   measure: bool = True) -> dict[str, float]:
    """Train a fresh model on `data`'s training part (then run the compression chain) and
    score it on its validation part."""

    from engine.models import build_model
    from engine.train import to_tensors, train

    device = ctx.device
    n_out = data.n_classes if data.task == "classification" else 1
    model = build_model(recipe.model, data.input_shape, n_out, seed=recipe.seed).to(device)
    tensors = to_tensors(data, device)
    train(model, data, recipe.train, device=device, seed=recipe.seed,
          augment_cfg=recipe.data.augment, tensors=tensors, on_progress=on_progress)
    if recipe.compress:
        model = _compress(recipe, model, data, tensors, n_out)
    return _scored(model, data, ctx, tensors, measure=measure)


def _scored(model: Any, data: DataBundle, ctx: _Context, tensors: dict[str, Any], *,
            measure: bool) -> dict[str, float]:
    """A trained model's validation score and loss, plus the size and speed objectives
    the search asks for when `measure`."""
    import torch

    from engine.models import set_training
    from engine.train import evaluate, metric_name

    set_training(model, False)
    val = evaluate(model, tensors["X_val"], tensors["y_val"], data.task)
    out = {"score": val.get(metric_name(data.task), math.nan), "loss": val.get("loss", math.nan)}
    if measure and "params" in ctx.tune["objectives"]:
        out["params"] = float(sum(int(torch.count_nonzero(p)) for p in model.parameters()))
    if measure and "latency_ms" in ctx.tune["objectives"]:
        from engine.latency import torch_latency

        out["latency_ms"] = torch_latency(model, data.input_shape, repeats=50)["median_ms"]
    return out


def _folds_together(recipe: Recipe, data: DataBundle, pool_X: np.ndarray,
                    pool_y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                    ctx: _Context) -> list[dict[str, float]]:
    """Train the k fold models of a trial as one batched ensemble (each member its fold's
    training rows, validating on its held-out fold, as the fold-by-fold loop does) and
    score each; [] when the recipe cannot be batched, so the loop trains them in turn."""
    from engine.ensemble import Member, blocker, fit_members
    from engine.train import to_tensors

    if blocker(recipe) is not None or len(splits) < 2:
        return []
    pool = dataclasses.replace(data, X_train=pool_X, y_train=pool_y, X_val=pool_X[:0],
                               y_val=pool_y[:0])
    members = [Member(idx=tr, val_idx=va, seed=recipe.seed) for tr, va in splits]
    trained = fit_members(recipe, pool, members, device=ctx.device, mix_lengths=True)
    fits = []
    for i, (model, (tr, va)) in enumerate(zip(trained.models, splits, strict=True)):
        part = dataclasses.replace(data, X_train=pool_X[tr], y_train=pool_y[tr],
                                   X_val=pool_X[va], y_val=pool_y[va])
        fits.append(_scored(model, part, ctx, to_tensors(part, ctx.device), measure=i == 0))
    return fits


def _compress(recipe: Recipe, model: Any, data: DataBundle, tensors: dict[str, Any],
              n_out: int) -> Any:
    from engine.compress import CompressContext, load_all

    registry = load_all()
    ctx = CompressContext(tensors=tensors, task=data.task, input_shape=data.input_shape,
                          n_out=n_out, train_cfg=recipe.train, model_cfg=recipe.model,
                          data=data, device=next(model.parameters()).device, seed=recipe.seed,
                          baseline_model=model)
    current = model
    for i, step in enumerate(recipe.compress):
        entry = registry.get(step["technique"])
        outcome = entry.fn(current, {k: v for k, v in step.items() if k != "technique"}, ctx)
        if outcome.model is None:
            raise UserError(f"compress[{i}] ({step['technique']}) yields an ONNX Runtime model "
                            f"that tuning cannot score; tune without it and add it after.")
        current = outcome.model
    return current


# --- the study ------------------------------------------------------------------------------

def _sampler(tune: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    name = tune["sampler"]
    if name == "grid":
        return optuna.samplers.GridSampler(_grid(tune["space"]), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if name == "nsga2":
        n = tune["n_trials"] or 20
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 3)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)


def _pruner(tune: dict[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    if tune["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if tune["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def _storage(url: str) -> optuna.storages.BaseStorage:
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several processes write: wait for the lock, don't fail
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, **kwargs)


def _open_study(url: str, name: str, tune: dict[str, Any], seed: int, *, create: bool
                ) -> optuna.Study:
    import optuna

    directions = [OBJECTIVES[o] for o in tune["objectives"]]
    kwargs = {"storage": _storage(url), "sampler": _sampler(tune, seed),
              "pruner": _pruner(tune), "study_name": name}
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(**kwargs, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise UserError(f"tune.study {name!r} already exists with other objectives; pick a "
                        f"new study name or the same objectives.")
    return study


def _counted(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False,
                                states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _trial_dict(t: optuna.trial.FrozenTrial, space: dict[str, Any]) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    out = {"number": t.number, "params": _decode(space, t.params),
           "values": list(t.values) if t.values is not None else None,
           "state": t.state.name, "duration_s": duration}
    if "fold_scores" in t.user_attrs:
        out["fold_scores"] = t.user_attrs["fold_scores"]
        out["folds_trained"] = t.user_attrs.get("folds_trained")
        out["std"] = t.user_attrs.get("std")
    return out


def search(recipe: Recipe, *, storage: str | None = None,
           on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the study that `recipe.tune` describes; return the tuning result.

    `on_trial(trial)` is called, in this process, for each trial that finishes during this
    call: {"number", "params", "values", "state", "duration_s"} plus "fold_scores" and
    "std" for k-fold validation."""
    import optuna

    from engine.store import default_url

    if recipe.tune is None:
        raise UserError("the recipe has no tune section; add one to search.")
    tune = validate_tune(recipe.tune)
    seed = recipe.seed if tune["seed"] is None else tune["seed"]
    space = tune["space"]
    base = recipe.to_dict()
    base["tune"] = None
    _probe(base, space)
    url = storage or default_url()
    name = tune["study"] or f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    n_total = tune["n_trials"]
    if n_total is None:  # grid: the whole grid
        n_total = math.prod(len(spec) for spec in space.values())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(url, name, tune, seed, create=True)
    seen = {t.number for t in study.get_trials(deepcopy=False)
            if t.state.name in _FINISHED}
    remaining = n_total - _counted(study)
    emit = on_trial or (lambda trial: None)

    def report_new(trials: list[optuna.trial.FrozenTrial]) -> None:
        for t in sorted(trials, key=lambda t: t.number):
            if t.number not in seen and t.state.name in _FINISHED:
                seen.add(t.number)
                emit(_trial_dict(t, space))

    if remaining > 0:
        workers = min(tune["workers"], remaining)
        if workers == 1 and not _on_ray():
            ctx = _make_context(recipe, tune, seed)
            _optimize(study, ctx, remaining, n_total,
                      callbacks=[lambda s, t: report_new([t])])
        else:  # on Ray, trials are always tasks: even one worker runs on the cluster
            run = _run_ray_workers if _on_ray() else _run_workers
            run(recipe, tune, url, name, seed, remaining, n_total, workers,
                lambda: report_new(study.get_trials(deepcopy=False)))
    report_new(study.get_trials(deepcopy=False))
    return _result(study, tune, name)


def _make_context(recipe: Recipe, tune: dict[str, Any], seed: int) -> _Context:
    from engine.train import resolve_device

    base = recipe.to_dict()
    base["tune"] = None
    return _Context(recipe, tune, base, resolve_device(recipe.device), seed)


def _optimize(study: optuna.Study, ctx: _Context, quota: int, n_total: int, *,
              callbacks: list[Callable[..., None]] = ()) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study.optimize(lambda trial: _objective(trial, ctx), n_trials=quota,
                   timeout=ctx.tune["timeout_s"],
                   callbacks=[MaxTrialsCallback(n_total, states=(TrialState.COMPLETE,
                                                                 TrialState.PRUNED)),
                              *callbacks])


def _run_workers(recipe: Recipe, tune: dict[str, Any], url: str, name: str, seed: int,
                 remaining: int, n_total: int, workers: int, poll: Callable[[], None]) -> None:
    """`workers` spawned processes share the study; the parent polls and waits. Each gets an
    equal share of the remaining trials, so that together they run exactly that many."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    errors = spawn.Queue()
    base = recipe.to_dict()
    base["tune"] = None
    threads = max(1, (os.cpu_count() or 1) // workers)
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    procs = [spawn.Process(target=_worker, args=(base, tune, url, name, seed + i, seed,
                                                 quota, n_total, threads, errors),
                           daemon=True)
             for i, quota in enumerate(quotas)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(POLL_S)
            poll()
    finally:
        for p in procs:
            p.join(timeout=None if not p.is_alive() else 5)
            if p.is_alive():
                p.terminate()
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    if problems:
        kind, message = problems[0]
        raise (UserError if kind == "UserError" else RuntimeError)(message)
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise RuntimeError(f"a tuning worker process ended with exit code {bad[0]}.")


def _worker(base: dict[str, Any], tune: dict[str, Any], url: str, name: str,
            sampler_seed: int, seed: int, quota: int, n_total: int, threads: int,
            errors: Any) -> None:
    """One worker process: run its share of the trials, its error sent to the parent."""
    try:
        run_trials(base, tune, url, name, sampler_seed, seed, quota, n_total, threads)
    except BaseException as exc:
        errors.put((type(exc).__name__, str(exc)))
        raise


def run_trials(base: dict[str, Any], tune: dict[str, Any], url: str, name: str,
               sampler_seed: int, seed: int, quota: int, n_total: int, threads: int) -> None:
    """Load the shared study and run `quota` of its trials here: the body of a worker
    process and of a Ray trial task."""
    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = Recipe.from_dict(base).replace(tune=tune)
    study = _open_study(url, name, tune, sampler_seed, create=False)
    _optimize(study, _make_context(recipe, tune, seed), quota, n_total)


def _on_ray() -> bool:
    """Whether trials fan out over Ray: the run is on the Ray backend (WORKBENCH_BACKEND)."""
    return os.environ.get("WORKBENCH_BACKEND", "").strip().lower() == "ray"


def _run_ray_workers(recipe: Recipe, tune: dict[str, Any], url: str, name: str, seed: int,
                     remaining: int, n_total: int, workers: int,
                     poll: Callable[[], None]) -> None:
    """`workers` Ray tasks share the study through the store, one CPU each; the caller
    polls the study for finished trials while they run."""
    from engine import ray_backend

    base = recipe.to_dict()
    base["tune"] = None
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    pending = ray_backend.search_workers([(base, tune, url, name, seed + i, seed, quota,
                                           n_total, 1) for i, quota in enumerate(quotas)])
    while pending:
        pending = ray_backend.wait(pending, POLL_S)
        poll()


# --- the result ----------------------------------------------------------------------------

def _result(study: optuna.Study, tune: dict[str, Any], name: str) -> dict[str, Any]:
    space = tune["space"]
    objectives = tune["objectives"]
    directions = [OBJECTIVES[o] for o in objectives]
    trials = [_trial_dict(t, space) for t in study.get_trials(deepcopy=False)]
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
        out["best_params"] = _decode(space, best.params)
        out["best_value"] = best.value
        out["best_number"] = best.number
    else:
        pareto = sorted(study.best_trials, key=lambda t: t.number)
        out["pareto"] = [{"number": t.number, "params": _decode(space, t.params),
                          "values": list(t.values)} for t in pareto]
        pick = max(pareto, key=lambda t: sign * t.values[0])  # best on the first objective
        out["best_params"] = _decode(space, pick.params)
        out["best_values"] = list(pick.values)
        out["best_number"] = pick.number
    out["trials"] = trials
    out["importances"] = _importances(study, complete) if len(objectives) == 1 else {}
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

    if len(complete) < 2:
        return {}
    varying = [p for p in complete[0]["params"]
               if len({json.dumps(t["params"].get(p), sort_keys=True) for t in complete}) > 1]
    if len(varying) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(study, params=varying)
    except Exception:  # importance is a nicety; a degenerate study must not fail the search
        return {}
    return {k: float(v) for k, v in found.items()}


def best_recipe(recipe: Recipe, tuning: dict[str, Any]) -> Recipe:
    """The recipe with the best trial's settings applied and no tune section."""
    raw = recipe.to_dict()
    raw["tune"] = None
    return Recipe.from_dict(apply_params(raw, tuning["best_params"]))


__all__ = ["apply_params", "best_recipe", "fold_indices", "search", "validate_tune"]
