"""Bias-variance decomposition (against mlxtend) and the verdict built on it."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LinearRegression
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from engine.data import DataBundle, load_data
from engine.diagnostics.bias_variance import (
    bias_variance,
    bootstrap_samples,
    zero_one_decomposition,
)
from engine.diagnostics.verdict import diagnose
from engine.errors import UserError
from engine.metrics import score
from engine.recipe import Recipe
from engine.runner import resolve
from engine.train import fit_fresh

LINEAR = {"model": {"source": "builtin:logreg"},
          "train": {"optimizer": "lbfgs", "batch_size": "full", "epochs": 10,
                    "early_stopping": None}}


def _setup(source: str, params: dict | None = None, **sections) -> tuple[Recipe, DataBundle]:
    raw = {**LINEAR, **sections, "data": {"source": source, "params": params or {}}}
    recipe = resolve(raw)
    return recipe, load_data(recipe.data, seed=0)


def _sklearn_fit(estimator, data: DataBundle):
    """The `fit` hook for a scikit-learn estimator: a clone refitted on the round's rows."""
    return lambda idx, r: clone(estimator).fit(data.X_train[idx], data.y_train[idx]).predict


# --- the decomposition ------------------------------------------------------------------

def test_squared_loss_is_bias_plus_variance_for_a_linear_model() -> None:
    recipe, data = _setup("builtin:diabetes")
    calls = []
    bv = bias_variance(recipe, data, rounds=4, seed=1, on_round=lambda d, t: calls.append((d, t)))
    assert bv["loss"] == "squared" and bv["rounds"] == 4
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert bv["expected_loss"] == pytest.approx(bv["bias"] + bv["variance"], rel=1e-9)
    assert bv["variance"] > 0  # bootstrap samples differ, so the fitted lines do
    assert len(bv["per_round_test_score"]) == 4
    assert all(0 < s < 1 for s in bv["per_round_test_score"])  # R² of a linear fit
    assert 0 < bv["bias"] < bv["target_variance"]  # better than predicting the mean


def test_bootstrap_samples_are_mlxtends_draws() -> None:
    from mlxtend.evaluate import bias_variance_decomp  # noqa: F401 - loads the module

    draw = sys.modules["mlxtend.evaluate.bias_variance_decomp"]._draw_bootstrap_sample
    rng = np.random.RandomState(5)
    rows = np.arange(30)
    theirs = [draw(rng, rows, rows)[0] for _ in range(4)]
    for ours, their in zip(bootstrap_samples(30, 4, 5), theirs, strict=True):
        np.testing.assert_array_equal(ours, their)


@pytest.mark.parametrize(("source", "estimator", "loss", "ties"), [
    ("builtin:wine", DecisionTreeClassifier(random_state=0), "0-1_loss", False),
    ("builtin:wine", DecisionTreeClassifier(random_state=0, max_depth=1), "0-1_loss", True),
    ("builtin:iris", DecisionTreeClassifier(random_state=0), "0-1_loss", True),
    ("builtin:diabetes", LinearRegression(), "mse", False),
    ("builtin:diabetes", DecisionTreeRegressor(random_state=0, max_depth=4), "mse", False),
], ids=["wine-tree", "wine-stump", "iris-tree", "diabetes-linear", "diabetes-tree"])
def test_matches_mlxtend(source: str, estimator, loss: str, ties: bool) -> None:
    from mlxtend.evaluate import bias_variance_decomp

    recipe, data = _setup(source)
    rounds, seed = 20, 3
    bv = bias_variance(recipe, data, rounds=rounds, seed=seed, fit=_sklearn_fit(estimator, data))
    theirs = bias_variance_decomp(clone(estimator), data.X_train, data.y_train, data.X_test,
                                  data.y_test, loss=loss, num_rounds=rounds, random_seed=seed)
    ours = (bv["expected_loss"], bv["bias"], bv["variance"])
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert bv["loss"] == ("zero_one" if loss == "0-1_loss" else "squared")
    if ties:  # some test points' votes tie here: both sides break them to the smallest label
        fit = _sklearn_fit(estimator, data)
        votes = [np.bincount(column) for column in np.stack([
            fit(idx, r)(data.X_test)
            for r, idx in enumerate(bootstrap_samples(len(data.y_train), rounds, seed))]).T]
        assert any((v == v.max()).sum() > 1 for v in votes)


def test_zero_one_by_hand_ties_and_domingos_signs() -> None:
    # 4 rounds x 4 test points; columns 0 and 1 tie 2-2 and go to the smaller label, 0
    all_pred = np.array([[0, 1, 2, 1], [1, 1, 2, 0], [1, 0, 0, 0], [0, 0, 2, 2]])
    y = np.array([0, 1, 0, 2])
    bv = zero_one_decomposition(all_pred, y)
    # main = [0, 0, 2, 0]: point 0 unbiased, points 1-3 biased
    assert bv["bias"] == 0.75
    assert bv["expected_loss"] == 0.625  # (0.5 + 0.5 + 0.75 + 0.75) / 4
    assert bv["variance"] == 0.4375  # (0.5 + 0.5 + 0.25 + 0.5) / 4
    assert bv["variance_unbiased"] == 0.125  # adds: point 0's disagreement
    assert bv["variance_biased"] == 0.25  # subtracts: rounds that hit y on points 1-3
    assert bv["net_variance"] == pytest.approx(-0.125)
    assert bv["expected_loss"] == pytest.approx(
        bv["bias"] + bv["variance_unbiased"] - bv["variance_biased"])
    assert "0.625 = bias 0.750 + 0.125" in bv["combination"]
    assert bv["per_round_test_score"] == [0.5, 0.25, 0.25, 0.5]  # 1 - 0.625 on average


def test_refuses_one_round_and_an_empty_test_part() -> None:
    recipe, data = _setup("builtin:iris")
    with pytest.raises(UserError, match="rounds"):
        bias_variance(recipe, data, rounds=1)
    empty = dataclasses.replace(data, X_test=data.X_test[:0], y_test=data.y_test[:0])
    with pytest.raises(UserError, match="test_fraction"):
        bias_variance(recipe, empty, rounds=2)


# --- the verdict, end to end --------------------------------------------------------------

def _scores(recipe: Recipe, data: DataBundle) -> tuple[float, float]:
    model, _ = fit_fresh(recipe, data, seed=0)
    return (score(model, data.X_train, data.y_train, data.task),
            score(model, data.X_val, data.y_val, data.task))


def _chance(data: DataBundle) -> float:
    return float(np.bincount(data.y_val).max() / len(data.y_val))


def test_linear_model_on_moons_is_high_bias() -> None:
    recipe, data = _setup("builtin:moons", {"noise": 0.3},
                          train={**LINEAR["train"], "epochs": 20})
    train, val = _scores(recipe, data)
    bv = bias_variance(recipe, data, rounds=3, seed=0)
    out = diagnose(train, val, task=data.task, bias_variance=bv, baseline_score=_chance(data))
    assert out["verdict"] == "high_bias", out
    assert train < 0.9 and abs(train - val) <= 0.05
    assert f"{train:.2f}" in out["reasons"][0] and f"{val:.2f}" in out["reasons"][0]
    assert f"{bv['bias']:.3g}" in " ".join(out["reasons"])
    assert any("capacity" in s for s in out["suggestions"])


def test_wide_unregularized_mlp_on_small_noisy_data_is_high_variance() -> None:
    recipe, data = _setup(
        "builtin:classification",
        {"n_samples": 120, "n_features": 40, "n_informative": 3, "flip_y": 0.2},
        model={"source": "builtin:mlp", "hidden": [512, 512], "dropout": 0.0},
        train={"optimizer": "adam", "lr": 0.003, "batch_size": "full", "epochs": 60,
               "early_stopping": None, "schedule": None})
    train, val = _scores(recipe, data)
    bv = bias_variance(recipe, data, rounds=3, seed=0)
    out = diagnose(train, val, task=data.task, bias_variance=bv, baseline_score=_chance(data))
    assert out["verdict"] == "high_variance", out
    assert train - val > 0.2  # memorized 72 rows, label noise included
    assert f"Training accuracy is {train:.2f} but validation accuracy {val:.2f}" in \
        out["reasons"][0]
    assert any("dropout" in s for s in out["suggestions"])
    assert any("early stopping" in s for s in out["suggestions"])


# --- the verdict's rules, as numbers -------------------------------------------------------

def test_a_large_gap_is_high_variance_and_cited_in_points() -> None:
    out = diagnose(0.99, 0.80, task="classification")
    assert out["verdict"] == "high_variance"
    assert out["reasons"][0] == ("Training accuracy is 0.99 but validation accuracy 0.80: a "
                                 "gap of 19 points, above the allowance of 5 points.")


@pytest.mark.parametrize(("train", "val", "task", "baseline", "verdict"), [
    (0.85, 0.84, "classification", None, "high_bias"),  # low training accuracy
    (0.93, 0.92, "classification", 0.90, "high_bias"),  # barely above the majority class
    (0.97, 0.95, "classification", 0.50, "good_fit"),
    (0.60, 0.58, "regression", None, "high_bias"),  # R² below 0.7
    (0.85, 0.83, "regression", 0.0, "good_fit"),
    (0.95, 0.70, "regression", None, "high_variance"),
    (0.70, 0.50, "classification", None, "high_variance"),  # the gap decides first
])
def test_score_rules(train: float, val: float, task: str, baseline: float | None,
                     verdict: str) -> None:
    out = diagnose(train, val, task=task, baseline_score=baseline)
    assert out["verdict"] == verdict
    assert f"{train:.2f}" in out["reasons"][0] and f"{val:.2f}" in out["reasons"][0]
    assert out["suggestions"]


def _bv(bias: float, variance: float, **extra) -> dict:
    return {"loss": "zero_one", "rounds": 10, "expected_loss": bias + variance / 2,
            "bias": bias, "variance": variance, **extra}


def test_decomposition_rules() -> None:
    # variance above bias and material: high variance despite a small gap
    assert diagnose(0.95, 0.93, task="classification",
                    bias_variance=_bv(0.04, 0.08))["verdict"] == "high_variance"
    # variance above a tiny bias but itself tiny: nothing to act on
    assert diagnose(0.99, 0.98, task="classification",
                    bias_variance=_bv(0.005, 0.01))["verdict"] == "good_fit"
    # bias dominating with good training scores (the test error is mostly bias)
    out = diagnose(0.95, 0.93, task="classification", bias_variance=_bv(0.2, 0.05))
    assert out["verdict"] == "high_bias"
    assert "bias 0.2 and variance 0.05: bias dominates" in out["reasons"][1]
    # squared loss is judged relative to the target's variance
    sq = {"loss": "squared", "rounds": 5, "expected_loss": 1300.0, "bias": 1000.0,
          "variance": 300.0, "target_variance": 5000.0}
    out = diagnose(0.8, 0.78, task="regression", bias_variance=sq)
    assert out["verdict"] == "good_fit"  # bias² is 20% of the target's variance, under 30%
    assert "bias² 1,000 and variance 300 (the target's own variance is 5,000)" in \
        out["reasons"][1]
    # a low training score with bias dominating outweighs a gap of a few points
    sq = {**sq, "bias": 3400.0, "variance": 90.0}
    assert diagnose(0.56, 0.50, task="regression")["verdict"] == "high_variance"
    out = diagnose(0.56, 0.50, task="regression", bias_variance=sq)
    assert out["verdict"] == "high_bias"
    assert "The gap of 0.06 is the smaller problem" in out["reasons"][-1]


def test_learning_curve_decides_whether_more_data_is_suggested() -> None:
    rising = {"train_sizes": [30, 60, 120], "val_score": [0.70, 0.78, 0.84],
              "val_std": [0.02, 0.02, 0.01]}
    flat = {**rising, "val_score": [0.80, 0.84, 0.843]}
    out = diagnose(1.0, 0.84, task="classification", learning_curve=rising)
    assert "0.78 at 60 training rows to 0.84 at 120 training rows" in out["reasons"][-1]
    assert any("Collect more training rows" in s and "6 points" in s
               for s in out["suggestions"])
    out = diagnose(0.84, 0.84, task="classification", learning_curve=flat)
    assert out["verdict"] == "high_bias"
    assert "levelled off" in out["reasons"][-1]
    assert any("will not help" in s for s in out["suggestions"])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="task"):
        diagnose(0.9, 0.9, task="ranking")
    with pytest.raises(ValueError, match="train_score"):
        diagnose(float("nan"), 0.9, task="classification")
