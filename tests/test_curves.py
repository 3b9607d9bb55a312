"""Learning and validation curves, Rademacher-style complexity and the loss landscape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import load_data
from engine.diagnostics.curves import (
    complexity_report,
    learning_curve,
    learning_subset,
    rademacher,
    validation_curve,
)
from engine.diagnostics.landscape import loss_landscape
from engine.errors import UserError
from engine.metrics import evaluate
from engine.recipe import Recipe
from engine.runner import resolve
from engine.train import fit_fresh


def small(source: str, hidden: list[int] | None = None, **train: object) -> Recipe:
    return resolve({
        "data": {"source": source},
        "model": {"source": "builtin:mlp", "hidden": hidden or [16]},
        "train": {"epochs": 20, "lr": 0.01, "early_stopping": None, **train}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds spin-waiting on a busy 2-core box
    (measured 5-10x slower), so this module runs on one and gives the count back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    recipe = small("builtin:digits", epochs=10, batch_size=128)
    return recipe, load_data(recipe.data, seed=0)


@pytest.fixture(scope="module")
def digits_curve(digits):
    recipe, data = digits
    steps = []
    curve = learning_curve(recipe, data, fractions=(0.1, 0.5, 1.0), repeats=2,
                           on_step=lambda done, total: steps.append((done, total)))
    return curve, steps, len(data.y_train)


def test_learning_curve_has_one_point_per_fraction(digits_curve):
    curve, steps, n = digits_curve
    assert curve["fractions"] == [0.1, 0.5, 1.0]
    assert curve["metric"] == "accuracy"
    for key in ("train_sizes", "train_score", "train_std", "val_score", "val_std"):
        assert len(curve[key]) == 3, key
    assert curve["train_sizes"] == sorted(curve["train_sizes"])
    assert curve["train_sizes"][0] < curve["train_sizes"][1] < curve["train_sizes"][2] == n
    assert all(s >= 0 for s in curve["train_std"] + curve["val_std"])
    assert all(0 <= s <= 1 for s in curve["train_score"] + curve["val_score"])
    assert steps == [(i, 6) for i in range(1, 7)]


def test_more_data_scores_higher_on_validation(digits_curve):
    curve, _, _ = digits_curve
    assert curve["val_score"][-1] > curve["val_score"][0] + 0.02


def test_stratified_subsets_keep_every_class_and_its_share():
    y = np.repeat(np.arange(5), [100, 50, 20, 10, 3])
    idx = learning_subset(y, 0.1, task="classification", rng=np.random.default_rng(0))
    counts = np.bincount(y[idx], minlength=5)
    assert counts.tolist() == [10, 5, 2, 2, 2]  # a tenth, but never under 2 rows a class
    assert len(np.unique(idx)) == len(idx)
    other = learning_subset(y, 0.1, task="classification", rng=np.random.default_rng(1))
    assert not np.array_equal(idx, other)  # repeats draw different rows
    assert np.array_equal(learning_subset(y, 1.0, task="classification",
                                          rng=np.random.default_rng(0)), np.arange(len(y)))
    reg = learning_subset(np.linspace(0, 1, 200), 0.25, task="regression",
                          rng=np.random.default_rng(0))
    assert len(reg) == 50


def test_learning_curve_refuses_an_empty_validation_part():
    recipe = resolve({"data": {"source": "builtin:iris", "val_fraction": 0.0},
                               "model": {"source": "builtin:logreg"},
                               "train": {"epochs": 1, "early_stopping": None}})
    with pytest.raises(UserError, match="val_fraction"):
        learning_curve(recipe, load_data(recipe.data, seed=0), repeats=1)


def test_validation_curve_gives_one_point_per_width():
    recipe = small("builtin:iris", epochs=10)
    data = load_data(recipe.data, seed=0)
    curve = validation_curve(recipe, data, param="model.hidden", values=[[2], [16], [32]],
                             repeats=2)
    assert curve["param"] == "model.hidden"
    assert curve["values"] == [[2], [16], [32]]
    for key in ("train_score", "train_std", "val_score", "val_std"):
        assert len(curve[key]) == 3, key
    assert all(s >= 0 for s in curve["train_std"] + curve["val_std"])
    epochs = validation_curve(recipe, data, param="train.epochs", values=[1, 5], repeats=1)
    assert epochs["values"] == [1, 5] and epochs["train_std"] == [0.0, 0.0]


def test_validation_curve_refuses_other_knobs():
    recipe = small("builtin:iris")
    data = load_data(recipe.data, seed=0)
    with pytest.raises(UserError, match=r"model\.hidden.*train\.epochs"):
        validation_curve(recipe, data, param="train.lr", values=[0.1, 0.01])
    logreg = resolve({"data": {"source": "builtin:iris"},
                               "model": {"source": "builtin:logreg"}})
    with pytest.raises(UserError, match="no effect"):
        validation_curve(logreg, data, param="model.hidden", values=[[8]])


def test_rademacher_grows_with_width(digits):
    _, data = digits
    fits = {}
    for width in (4, 256):
        recipe = small("builtin:digits", [width], epochs=60)
        fits[width] = rademacher(recipe, data, rounds=2, max_rows=256)
    narrow, wide = fits[4], fits[256]
    assert narrow["rows"] == 256 and narrow["chance"] == pytest.approx(0.1)
    assert narrow["fit_std"] >= 0 and len(narrow["fits"]) == 2
    assert wide["fit"] > narrow["fit"] + 0.3, (narrow, wide)
    assert wide["fit"] > 0.8


def test_rademacher_on_regression_is_a_clipped_r2():
    recipe = resolve({"data": {"source": "builtin:diabetes"},
                               "model": {"source": "builtin:mlp", "hidden": [64]},
                               "train": {"epochs": 30, "lr": 0.01}})
    data = load_data(recipe.data, seed=0)
    result = rademacher(recipe, data, rounds=1, max_rows=128)
    assert result["metric"] == "r2" and result["chance"] is None
    assert 0.0 <= result["fit"] <= 1.0


def test_complexity_report_counts_parameters(digits):
    recipe, data = digits
    model, _ = fit_fresh(recipe, data, seed=0, train={"epochs": 0})
    report = complexity_report(model, data)
    assert report["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert report["flops"] > 0 and report["nonzero_params"] <= report["params"]


@pytest.fixture(scope="module")
def iris_logreg():
    recipe = resolve({
        "data": {"source": "builtin:iris"}, "model": {"source": "builtin:logreg"},
        "train": {"optimizer": "lbfgs", "batch_size": "full", "epochs": 10,
                  "early_stopping": None}})
    data = load_data(recipe.data, seed=0)
    return fit_fresh(recipe, data, seed=0)[0], data


def test_landscape_center_is_the_models_loss_and_the_slice_minimum(iris_logreg):
    model, data = iris_logreg
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = loss_landscape(model, data, points=21, span=1.0)
    assert len(out["alphas"]) == len(out["loss"]) == 21
    assert out["alphas"][10] == pytest.approx(0.0, abs=1e-12)
    X = torch.as_tensor(data.X_train)
    y = torch.as_tensor(data.y_train, dtype=torch.long)
    expected = evaluate(model, X, y, data.task)["loss"]
    assert out["center_loss"] == pytest.approx(expected, rel=1e-5)
    assert out["loss"][10] == pytest.approx(expected, rel=1e-5)
    assert min(out["loss"]) >= out["center_loss"] - 1e-3
    assert out["sharpness"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_landscape_two_d_grid_and_determinism(iris_logreg):
    model, data = iris_logreg
    out = loss_landscape(model, data, points=5, span=0.5, two_d=True, part="val", seed=3)
    assert len(out["alphas"]) == len(out["betas"]) == 5
    assert len(out["loss"]) == 5 and all(len(row) == 5 for row in out["loss"])
    assert out["loss"][2][2] == pytest.approx(out["center_loss"])
    again = loss_landscape(model, data, points=5, span=0.5, two_d=True, part="val", seed=3)
    assert again["loss"] == out["loss"]
    with pytest.raises(UserError, match="part"):
        loss_landscape(model, data, part="holdout")


def test_landscape_leaves_biases_still():
    from engine.diagnostics.landscape import filter_normalized

    w = torch.randn(6, 4)
    w[2] = 0  # a pruned filter stays pruned
    d, b = filter_normalized([w, torch.randn(6)], torch.Generator().manual_seed(0))
    assert torch.equal(b, torch.zeros(6))
    assert torch.allclose(d.norm(dim=1), w.norm(dim=1), atol=1e-5)
