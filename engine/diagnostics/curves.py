"""Learning curves, validation curves and model complexity: under- or over-fitting?

A learning curve trains fresh models on growing parts of the training data: a gap between
the training and validation scores that stays open says more data would help (variance);
two low scores that meet early say the model is too simple (bias). A validation curve
turns one complexity knob instead. The Rademacher-style complexity asks how well the
architecture can fit random labels: what it can memorize, it can overfit.

Every figure is a plain record of lists (means and sample standard deviations over seeded
repeats); `plots.py` draws them. Scores are accuracy (classification) or R² (regression).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.ensemble import Member, fit_members
from engine.errors import UserError
from engine.metrics import metric_name, score
from engine.models import MODELS, complexity
from engine.recipe import Recipe
from engine.train import fit_fresh

StepFn = Callable[[int, int], None]  # on_step(done, total), after every fresh model

# The knobs a validation curve may turn: recipe path -> the model setting it needs in the
# architecture's `uses` (None: a training setting, which every model has).
KNOBS: dict[str, str | None] = {
    "model.hidden": "hidden",  # values are lists of widths: [[8], [32], [128], [512]]
    "model.dropout": "dropout",
    "train.l2": None,
    "train.weight_decay": None,
    "train.epochs": None,
}


def _spread(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single run."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _need_val(data: DataBundle, what: str) -> None:
    if len(data.y_val) == 0:
        raise UserError(f"a {what} scores fresh models on the validation part, but it is "
                        f"empty; set data.val_fraction above 0.")


def learning_subset(y: np.ndarray, fraction: float, *, task: str,
                    rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of a random `fraction` of the training labels `y`.

    Classification keeps each class's share, with at least 2 rows of every class that has
    them, so a small fraction still shows the model every class. Fraction 1 is every row."""
    n = len(y)
    if not 0 < fraction <= 1:
        raise UserError(f"learning-curve fractions must lie in (0, 1], got {fraction!r}.")
    if fraction == 1:
        return np.arange(n)
    if task != "classification":
        return np.sort(rng.choice(n, size=min(n, max(2, round(fraction * n))), replace=False))
    picked = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        take = min(len(rows), max(2, round(fraction * len(rows))))
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def learning_curve(recipe: Recipe, data: DataBundle, *,
                   fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0), repeats: int = 3,
                   seed: int = 0, on_step: StepFn | None = None,
                   device: torch.device | None = None) -> dict[str, Any]:
    """Training and validation scores of fresh models trained on growing training parts.

    For each fraction, `repeats` models train on different random subsets (stratified for
    classification) with seeds seed, seed+1, ...; the same seeds recur at every fraction, so
    the curve's steps come from the data, not the initialization. At fraction 1 the repeats
    differ only by seed. Train scores are on the rows each model saw."""
    fractions = sorted(float(f) for f in fractions)
    if not fractions or repeats < 1:
        raise UserError("a learning curve needs at least one fraction and one repeat.")
    _need_val(data, "learning curve")
    out: dict[str, list[float]] = {k: [] for k in (
        "train_sizes", "train_score", "train_std", "val_score", "val_std")}
    subsets = [[learning_subset(data.y_train, frac, task=data.task,
                                rng=np.random.default_rng((seed, i, r)))
                for r in range(repeats)] for i, frac in enumerate(fractions)]
    # every model at once: one batched ensemble per subset size where the recipe allows
    trained = fit_members(recipe, data, [Member(idx=idx, seed=seed + r) for row in subsets
                                      for r, idx in enumerate(row)],
                       device=device, on_member=on_step)
    models = iter(trained.models)
    for row in subsets:
        train_scores, val_scores, sizes = [], [], []
        for idx in row:
            model = next(models)
            train_scores.append(score(model, data.X_train[idx], data.y_train[idx], data.task))
            val_scores.append(score(model, data.X_val, data.y_val, data.task))
            sizes.append(len(idx))
        out["train_sizes"].append(round(float(np.mean(sizes))))
        out["train_score"].append(float(np.mean(train_scores)))
        out["train_std"].append(_spread(train_scores))
        out["val_score"].append(float(np.mean(val_scores)))
        out["val_std"].append(_spread(val_scores))
    return {"fractions": fractions, **out, "repeats": repeats,
            "metric": metric_name(data.task), "training": trained.summary()}


def _check_knob(recipe: Recipe, param: str) -> None:
    if param not in KNOBS:
        raise UserError(f"validation_curve cannot vary {param!r}; choose one of "
                        f"{', '.join(KNOBS)}.")
    setting = KNOBS[param]
    if setting is None:
        return
    source = recipe.model.source
    arch = source.removeprefix("builtin:") if source.startswith("builtin:") else \
        recipe.model.architecture
    uses = MODELS.get(arch).extra.get("uses", ()) if arch is not None else ()
    if setting not in uses:
        raise UserError(f"{param} has no effect on the model {arch or source!r}; vary a "
                        f"training setting ({', '.join(k for k, v in KNOBS.items() if v is None)})"
                        f" or pick a model that uses it.")


def validation_curve(recipe: Recipe, data: DataBundle, *, param: str, values: Sequence[Any],
                     repeats: int = 2, seed: int = 0, on_step: StepFn | None = None,
                     device: torch.device | None = None) -> dict[str, Any]:
    """Training and validation scores of fresh models at each value of one complexity knob.

    `param` is a recipe path from `KNOBS`; every model trains on the whole training part.
    For "train.epochs" early stopping is switched off, or it would cap the very knob the
    curve turns."""
    _check_knob(recipe, param)
    values = list(values)
    if not values or repeats < 1:
        raise UserError("a validation curve needs at least one value and one repeat.")
    _need_val(data, "validation curve")
    section, key = param.split(".")
    out: dict[str, list[float]] = {k: [] for k in (
        "train_score", "train_std", "val_score", "val_std")}
    members = []
    for value in values:
        plain = list(value) if isinstance(value, (list, tuple)) else value
        overrides: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
        overrides[section][key] = plain
        if param == "train.epochs":
            overrides["train"]["early_stopping"] = None
        members += [Member(seed=seed + r, **overrides) for r in range(repeats)]
    # training knobs (l2, weight decay, epochs) vary per member inside one batched stack;
    # model knobs (widths, dropout) give one stack per value
    trained = fit_members(recipe, data, members, device=device, on_member=on_step)
    models = iter(trained.models)
    for _value in values:
        train_scores, val_scores = [], []
        for _ in range(repeats):
            model = next(models)
            train_scores.append(score(model, data.X_train, data.y_train, data.task))
            val_scores.append(score(model, data.X_val, data.y_val, data.task))
        out["train_score"].append(float(np.mean(train_scores)))
        out["train_std"].append(_spread(train_scores))
        out["val_score"].append(float(np.mean(val_scores)))
        out["val_std"].append(_spread(val_scores))
    return {"param": param,
            "values": [list(v) if isinstance(v, (list, tuple)) else v for v in values],
            **out, "repeats": repeats, "metric": metric_name(data.task),
            "training": trained.summary()}


def rademacher(recipe: Recipe, data: DataBundle, *, rounds: int = 3, seed: int = 0,
               max_rows: int = 512, on_step: StepFn | None = None,
               device: torch.device | None = None) -> dict[str, Any]:
    """How well the architecture fits random labels: an empirical Rademacher-style complexity.

    Each round trains a fresh model on up to `max_rows` training inputs with random labels
    (uniform classes; for regression ±1 targets scaled to y's mean and spread), without
    early stopping (it would stop the memorizing this measures). `fit` rescales the training
    score: for classification (accuracy - 1/K) / (1 - 1/K), 0 at chance and 1 when every
    random label is memorized; for regression R² clipped to [0, 1]."""
    if rounds < 1 or max_rows < 2:
        raise UserError("rademacher needs at least one round and max_rows of at least 2.")
    classify = data.task == "classification"
    fits, raws = [], []
    for r in range(rounds):
        rng = np.random.default_rng((seed, r))
        n = len(data.y_train)
        idx = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
        X = data.X_train[idx]
        if classify:
            labels = rng.integers(0, data.n_classes, size=len(idx)).astype(data.y_train.dtype)
        else:
            y = data.y_train.astype(np.float64)
            signs = rng.choice((-1.0, 1.0), size=len(idx))
            labels = (y.mean() + (y.std() or 1.0) * signs).astype(np.float32)
        # no validation or test rows: nothing is scored on them, and no true label leaks in
        noise = dataclasses.replace(data, X_train=X, y_train=labels, X_val=X[:0],
                                    y_val=labels[:0], X_test=X[:0], y_test=labels[:0])
        model, _ = fit_fresh(recipe, noise, seed=seed + r, device=device,
                             train={"early_stopping": None})
        raw = score(model, X, labels, data.task)
        if classify:
            chance = 1.0 / data.n_classes
            fits.append((raw - chance) / (1 - chance))
        else:
            fits.append(float(np.clip(raw, 0.0, 1.0)))
        raws.append(raw)
        if on_step is not None:
            on_step(r + 1, rounds)
    return {"fit": float(np.mean(fits)), "fit_std": _spread(fits), "fits": fits,
            "train_score": float(np.mean(raws)), "rows": int(min(len(data.y_train), max_rows)),
            "rounds": rounds, "metric": metric_name(data.task),
            "chance": 1.0 / data.n_classes if classify else None}


def complexity_report(model: nn.Module, data: DataBundle) -> dict[str, int]:
    """Parameters (all, trainable, non-zero), FLOPs per sample and size of a trained model.

    The Rademacher-style figure is `rademacher`, apart, because it trains models."""
    return complexity(model, data.input_shape)
