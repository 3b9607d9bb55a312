"""Bias-variance decomposition of the test error over bootstrap rounds.

Each round trains a fresh model on a bootstrap sample of the training part (drawn with
replacement, the same size) and predicts the test part. Over the rounds:

- squared loss (regression): the main prediction is the mean; expected loss = bias² +
  variance exactly, with bias² = mean (main - y)² and variance = mean (pred - main)².
- 0-1 loss (classification, Domingos 2000): the main prediction is the mode (ties go to
  the smallest label); bias = the main prediction's error rate; variance = how often a
  round disagrees with the main prediction. Variance adds to the loss on points the main
  prediction gets right and subtracts on points it gets wrong, so expected loss = bias +
  net variance, where the net variance can be far below the variance.

The test labels stand for the truth, so label noise counts as bias, as in mlxtend's
`bias_variance_decomp`, whose sampling this module reproduces draw for draw: one
`np.random.RandomState(seed)` for the whole decomposition and `rng.choice(rows, n,
replace=True)` per round. (NumPy's newer `default_rng` draws a different stream; the
legacy generator is kept stable by NumPy's compatibility policy, which is what makes the
comparison with mlxtend exact.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.data import DataBundle
from engine.ensemble import Member, fit_members
from engine.errors import UserError
from engine.metrics import predict, r2
from engine.recipe import Recipe

if TYPE_CHECKING:
    import torch

PredictFn = Callable[[np.ndarray], np.ndarray]  # X -> labels / values (n,) or scores (n, k)
FitFn = Callable[[np.ndarray, int], PredictFn]  # (bootstrap rows, round) -> predict


def bootstrap_samples(n: int, rounds: int, seed: int) -> list[np.ndarray]:
    """The training rows of every round: mlxtend's draws, for the same n, rounds and seed."""
    rng = np.random.RandomState(seed)
    rows = np.arange(n)
    return [rng.choice(rows, size=n, replace=True) for _ in range(rounds)]


def bias_variance(recipe: Recipe, data: DataBundle, *, rounds: int = 20, seed: int = 0,
                  on_round: Callable[[int, int], None] | None = None,
                  fit: FitFn | None = None,
                  device: torch.device | None = None) -> dict[str, Any]:
    """Decompose the test loss of the recipe's model into bias and variance.

    `fit(idx, r)` trains round r's model on the training rows `idx` and returns its predict
    function; by default fresh models of the recipe (seed `seed + r`, on `device`), every
    round trained at once as a batched ensemble where the recipe allows (engine/ensemble.py),
    which `training` then records. `on_round(done, rounds)` reports progress. Returns plain
    numbers: the loss ("squared" or "zero_one"), expected_loss, bias, variance,
    per_round_test_score, and for 0-1 loss net_variance with its parts and a one-sentence
    `combination`."""
    if rounds < 2:
        raise UserError(f"diagnose.bias_variance.rounds must be at least 2, got {rounds!r}; "
                        f"one model has no variance to measure.")
    if len(data.y_test) == 0:
        raise UserError("the bias-variance decomposition is measured on the test part, which "
                        "is empty; set data.test_fraction above 0.")
    if len(data.y_train) == 0:
        raise UserError("the bias-variance decomposition needs training rows to resample; "
                        "lower data.val_fraction or data.test_fraction.")
    samples = bootstrap_samples(len(data.y_train), rounds, seed)
    classify = data.task == "classification"
    training = None
    if fit is None:  # fresh models of the recipe, every round at once where they batch
        fit, training = _ensemble_fitter(recipe, data, samples, seed=seed, device=device,
                                         on_round=on_round)
        on_round = None  # reported as the ensemble's members finished

    def one_round(r: int) -> np.ndarray:  # independent of the other rounds: parallel-safe
        out = np.asarray(fit(samples[r], r)(data.X_test))
        if classify:
            return (out.argmax(1) if out.ndim == 2 else out).astype(np.int64)
        return out.reshape(len(data.y_test)).astype(np.float64)

    preds = []
    for done, pred in enumerate(map(one_round, range(rounds)), start=1):
        preds.append(pred)
        if on_round is not None:
            on_round(done, rounds)
    all_pred = np.stack(preds)  # (rounds, test rows)
    if classify:
        out = zero_one_decomposition(all_pred, np.asarray(data.y_test, dtype=np.int64))
    else:
        out = squared_decomposition(all_pred, np.asarray(data.y_test, dtype=np.float64))
    if training is not None:
        out["training"] = training
    return out


def _ensemble_fitter(recipe: Recipe, data: DataBundle, samples: list[np.ndarray], *,
                     seed: int, device: torch.device | None,
                     on_round: Callable[[int, int], None] | None
                     ) -> tuple[FitFn, dict[str, Any]]:
    """Train round r's fresh model (seed + r, rows samples[r]) for every round at once
    (a batched ensemble where the architecture allows) and serve them as `fit`."""
    members = [Member(idx=idx, seed=seed + r) for r, idx in enumerate(samples)]
    trained = fit_members(recipe, data, members, device=device, on_member=on_round)

    def fit(idx: np.ndarray, r: int) -> PredictFn:
        model = trained.models[r]
        return lambda X: predict(model, X)

    return fit, trained.summary()


def squared_decomposition(all_pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Squared-loss decomposition of predictions (rounds, n) against targets (n,)."""
    main = all_pred.mean(0)
    r2s = [r2(y, p) for p in all_pred]
    return {"loss": "squared", "metric": "r2", "rounds": len(all_pred),
            "expected_loss": float(((all_pred - y) ** 2).mean()),
            "bias": float(((main - y) ** 2).mean()),  # the squared bias
            "variance": float(((all_pred - main) ** 2).mean()),
            "target_variance": float(y.var()),  # the loss of predicting the mean: a scale
            "per_round_test_score": r2s}


def zero_one_decomposition(all_pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Domingos' 0-1 loss decomposition of labels (rounds, n) against labels (n,)."""
    rounds, n = all_pred.shape
    votes = np.zeros((int(max(all_pred.max(), y.max())) + 1, n), dtype=np.int64)
    for pred in all_pred:
        votes[pred, np.arange(n)] += 1
    main = votes.argmax(0)  # the mode; argmax takes the smallest label on a tie
    biased = main != y
    disagree = (all_pred != main).mean(0)  # per point: rounds that leave the main prediction
    hit = (all_pred == y).mean(0)  # on a biased point, only rounds that land on y lower the loss
    expected_loss = float((all_pred != y).mean())
    bias = float(biased.mean())
    v_unbiased = float(np.where(biased, 0.0, disagree).mean())
    v_biased = float(np.where(biased, hit, 0.0).mean())
    return {"loss": "zero_one", "metric": "accuracy", "rounds": rounds,
            "expected_loss": expected_loss, "bias": bias, "variance": float(disagree.mean()),
            "net_variance": expected_loss - bias, "variance_unbiased": v_unbiased,
            "variance_biased": v_biased,
            "combination": (
                f"Under 0-1 loss variance adds to the error on test points the main "
                f"prediction gets right and subtracts on those it gets wrong: expected loss "
                f"{expected_loss:.3f} = bias {bias:.3f} + {v_unbiased:.3f} (variance on "
                f"unbiased points) - {v_biased:.3f} (variance on biased points), a net "
                f"variance of {expected_loss - bias:.3f}."),
            "per_round_test_score": [float(s) for s in (all_pred == y).mean(1)]}
