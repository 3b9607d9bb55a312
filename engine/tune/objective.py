"""One trial: a fresh model trained with the sampled settings and scored on data its
training never saw.

- `holdout`: train on the training part, score on the validation part. The validation
  score is reported after every epoch, so a pruner can stop a hopeless trial early.
- `kfold` / `stratified`: the training and validation parts are pooled and cut into
  `folds` disjoint validation folds; one fresh model per fold is trained on the other
  folds (as one batched ensemble where the recipe allows, engine/ensemble.py). The score
  is the mean over folds (the std is kept with the trial); the running mean is reported
  after each fold. The preprocessing is not refitted per fold: the bundle was already
  scaled on the training part by `load_data`, so the scaler saw the pooled training rows
  but never the test part. That small, shared leak affects every trial alike and does not
  change which settings win. The fold's validation rows also drive early stopping, as the
  validation part does in a holdout run.

With a compression chain in the recipe, a trial runs the chain after training and scores
the last step's model, so `compress.N.KEY` settings can be tuned too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.compress import CompressContext, resolve_chain, run_chain
from engine.data import DataBundle, kfold, load_data, stratified_kfold
from engine.ensemble import Member, blocker, fit_members
from engine.errors import UserError
from engine.latency import torch_latency
from engine.metrics import evaluate, metric_name
from engine.models import set_training
from engine.recipe import Recipe
from engine.sections import resolve_sections
from engine.train import fit_fresh, resolve_device, to_tensors
from engine.tune.space import apply_params, suggest

if TYPE_CHECKING:
    import optuna

def trial_recipe(base: dict[str, Any], params: dict[str, Any]) -> Recipe:
    """The recipe a trial trains: `base` with `params` applied, resolved again (another
    optimizer's default learning rate, a changed compression step's settings)."""
    raw = apply_params(base, params)
    raw["tune"] = None
    recipe = resolve_sections(Recipe.from_dict(raw))
    return recipe.replace(compress=resolve_chain(recipe.compress))


def probe(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Refuse a bad value before any trial runs: every choice and both ends of every range
    must make a valid recipe."""
    for path, spec in space.items():
        values = spec if isinstance(spec, list) else [spec["low"], spec["high"]]
        for value in values:
            try:
                trial_recipe(base, {path: value})
            except UserError as exc:
                raise UserError(f"tune.space[{path!r}] value {value!r} makes a bad recipe: "
                                f"{exc}") from None



# --- validation folds and one trial ------------------------------------------------------------

def fold_indices(y: np.ndarray, validation: str, folds: int, *, seed: int, task: str
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index pairs into `y` (the pooled training and validation rows): the
    validation folds are disjoint and cover every row once."""
    if validation == "stratified":
        if task != "classification":
            raise UserError("tune.validation 'stratified' needs a classification task; use "
                            "'kfold' for regression.")
        return list(stratified_kfold(y, folds, seed=seed))
    return list(kfold(len(y), folds, seed=seed))


@dataclasses.dataclass
class Context:
    """What every trial of one process shares: the recipe, the data, the device."""

    recipe: Recipe
    tune: dict[str, Any]
    base: dict[str, Any]  # the recipe as a dict, without its tune section
    device: Any
    seed: int
    data_cache: dict[str, DataBundle] = dataclasses.field(default_factory=dict)

    def data(self, recipe: Recipe) -> DataBundle:
        """Loaded once per search (again only when the trial changes data settings)."""
        key = json.dumps(dataclasses.asdict(recipe.data), sort_keys=True, default=str)
        if key not in self.data_cache:
            if len(self.data_cache) >= 4:
                self.data_cache.pop(next(iter(self.data_cache)))
            self.data_cache[key] = load_data(recipe.data, seed=recipe.seed,
                                             model_source=recipe.model.source)
        return self.data_cache[key]


def objective(trial: optuna.trial.Trial, ctx: Context) -> float | list[float]:
    """Score one trial (Optuna's objective): its value, or its values for several
    objectives; the fold scores go to the trial's user attributes."""
    import optuna

    tune = ctx.tune
    params = suggest(trial, tune["space"])
    recipe = trial_recipe(ctx.base, params)
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


def _fit_and_score(recipe: Recipe, data: DataBundle, ctx: Context,
                   on_progress: Callable[[dict[str, Any]], None] | None, *,
                   measure: bool = True) -> dict[str, float]:
    """Train a fresh model on `data`'s training part (then run the compression chain) and
    score it on its validation part."""
    tensors = to_tensors(data, ctx.device)
    model, _ = fit_fresh(recipe, data, device=ctx.device, tensors=tensors,
                         on_progress=on_progress)
    if recipe.compress:
        model = _compress(recipe, model, data, tensors)
    return _scored(model, data, ctx, tensors, measure=measure)


def _scored(model: Any, data: DataBundle, ctx: Context, tensors: dict[str, Any], *,
            measure: bool) -> dict[str, float]:
    """A trained model's validation score and loss, plus the size and speed objectives
    the search asks for when `measure`."""
    set_training(model, False)
    val = evaluate(model, tensors["X_val"], tensors["y_val"], data.task)
    out = {"score": val.get(metric_name(data.task), math.nan), "loss": val.get("loss", math.nan)}
    if measure and "params" in ctx.tune["objectives"]:
        out["params"] = float(sum(int(torch.count_nonzero(p)) for p in model.parameters()))
    if measure and "latency_ms" in ctx.tune["objectives"]:
        out["latency_ms"] = torch_latency(model, data.input_shape, repeats=50)["median_ms"]
    return out


def _folds_together(recipe: Recipe, data: DataBundle, pool_X: np.ndarray,
                    pool_y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                    ctx: Context) -> list[dict[str, float]]:
    """Train the k fold models of a trial as one batched ensemble (each member its fold's
    training rows, validating on its held-out fold, as the fold-by-fold loop does) and
    score each; [] when the recipe cannot be batched, so the loop trains them in turn."""
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


def _compress(recipe: Recipe, model: Any, data: DataBundle,
              tensors: dict[str, Any]) -> Any:
    ctx = CompressContext(tensors=tensors, task=data.task, input_shape=data.input_shape,
                          n_out=data.n_outputs, train_cfg=recipe.train, model_cfg=recipe.model,
                          data=data, device=next(model.parameters()).device, seed=recipe.seed,
                          baseline_model=model)
    current = model
    for i, step, outcome in run_chain(model, recipe.compress, ctx):
        if outcome.model is None:
            raise UserError(f"compress[{i}] ({step['technique']}) yields an ONNX Runtime model "
                            f"that tuning cannot score; tune without it and add it after.")
        current = outcome.model
    return current


def make_context(recipe: Recipe, tune: dict[str, Any], seed: int) -> Context:
    """What the trials of one process share: the recipe without its tune section."""
    base = recipe.to_dict()
    base["tune"] = None
    return Context(recipe, tune, base, resolve_device(recipe.device), seed)
