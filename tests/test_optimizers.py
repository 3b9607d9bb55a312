"""Every optimizer trains; the second-order ones reach scikit-learn's optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import engine
from engine.data import load_data
from engine.errors import UserError
from engine.models import build_model
from engine.optimizers import OPTIMIZERS
from engine.recipe import Recipe
from engine.regularization import penalty
from engine.runner import resolve
from engine.train import train

FULL_BATCH = {"lbfgs", "newton", "bfgs"}
CPU = torch.device("cpu")


def logreg_recipe(optimizer: str, **train_cfg) -> Recipe:
    full = optimizer in FULL_BATCH
    cfg = {"optimizer": optimizer, "epochs": 20 if full else 30,
           "batch_size": "full" if full else 32, "early_stopping": None, **train_cfg}
    return resolve({"data": {"source": "builtin:breast_cancer"},
                             "model": {"source": "builtin:logreg"}, "train": cfg})


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_trains_logistic_regression(name):
    result = engine.run(logreg_recipe(name))
    metrics = result["variants"][0]["metrics"]
    assert metrics["test_accuracy"] >= 0.93, metrics
    history = result["variants"][0]["history"]
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_sgd_variants_are_batch_stochastic_and_minibatch():
    """batch_size "full" takes one step an epoch, 1 takes one per example."""
    steps = {}
    for batch in ("full", 1, 16):
        recipe = logreg_recipe("sgd", batch_size=batch, epochs=1)
        data = load_data(recipe.data, seed=0)
        model = build_model(recipe.model, data.input_shape, 2, seed=0)
        counter = {"n": 0}
        model.register_forward_hook(lambda *a, c=counter: c.__setitem__("n", c["n"] + 1))
        train(model, data, recipe.train, device=CPU, seed=0)
        steps[batch] = counter["n"] - 1  # minus the validation pass
    n = len(data.y_train)
    assert steps == {"full": 1, 1: n, 16: -(-n // 16)}


@pytest.mark.parametrize("name", ["newton", "lbfgs", "bfgs"])
def test_second_order_methods_reach_sklearn_loss(name):
    """Same L2 strength: ours adds l2/2 * |W|^2 over two softmax rows, which at the optimum
    (W = [-w/2, w/2]) is l2/4 * |w|^2; scikit-learn's |w|^2 / (2 C n) matches at C = 2/(l2 n)."""
    lam = 0.01
    recipe = logreg_recipe(name, l2=lam, epochs=30)
    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, 2, seed=0)
    train(model, data, recipe.train, device=CPU, seed=0)
    X, y = torch.tensor(data.X_train), torch.tensor(data.y_train)
    with torch.no_grad():
        ours = float(torch.nn.functional.cross_entropy(model(X), y)
                     + penalty([model.out.weight], 0.0, lam))
    n = len(y)
    sk = LogisticRegression(C=2 / (lam * n), tol=1e-12, max_iter=10_000)
    sk.fit(data.X_train, data.y_train)
    p = sk.predict_proba(data.X_train)[np.arange(n), data.y_train]
    theirs = -np.log(p).mean() + (sk.coef_ ** 2).sum() / (2 * sk.C * n)
    assert abs(ours - theirs) < 1e-3, (ours, theirs)


def test_newton_refuses_large_models_and_suggests_lbfgs():
    recipe = resolve({"data": {"source": "builtin:digits"},
                               "model": {"source": "builtin:mlp", "hidden": [64]},
                               "train": {"optimizer": "newton", "batch_size": "full",
                                         "epochs": 1}})
    with pytest.raises(UserError, match="lbfgs"):
        engine.run(recipe)


def test_newton_refuses_dropout():
    recipe = resolve({"data": {"source": "builtin:iris"},
                               "model": {"source": "builtin:logreg", "dropout": 0.2},
                               "train": {"optimizer": "bfgs", "batch_size": "full"}})
    with pytest.raises(UserError, match="dropout"):
        engine.run(recipe)


def test_optimizer_defaults_fill_the_learning_rate():
    assert resolve({"train": {"optimizer": "newton"}}).train.lr == 1.0
    assert resolve({"train": {"optimizer": "sgd"}}).train.lr == 0.01
    assert resolve({"train": {"optimizer": "sgd", "lr": 0.3}}).train.lr == 0.3


def test_optimizer_options_are_checked():
    with pytest.raises(UserError, match="beta1"):
        resolve({"train": {"optimizer": "adam", "optimizer_options": {"beta": 0.8}}})
    recipe = resolve({"train": {"optimizer": "adam",
                                         "optimizer_options": {"beta1": 0.8}}})
    assert recipe.train.optimizer_options == {"beta1": 0.8, "beta2": 0.999, "eps": 1e-8,
                                              "amsgrad": False}
