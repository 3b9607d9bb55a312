"""L1, L2, decoupled decay, early stopping, clipping, freezing, divergence, determinism."""

from __future__ import annotations

import math

import pytest
import torch

import engine
from engine.data import load_data
from engine.errors import UserError
from engine.models import build_model
from engine.runner import TrainingDivergedError, resolve
from engine.train import train

CPU = torch.device("cpu")


def fit(recipe_dict: dict) -> tuple[torch.nn.Module, object]:
    recipe = resolve(recipe_dict)
    data = load_data(recipe.data, seed=recipe.seed)
    n_out = data.n_classes or 1
    model = build_model(recipe.model, data.input_shape, n_out, seed=recipe.seed)
    return model, train(model, data, recipe.train, device=CPU, seed=recipe.seed)


def wine_logreg(**train_cfg) -> dict:
    return {"data": {"source": "builtin:wine"}, "model": {"source": "builtin:logreg"},
            "train": {"optimizer": "adam", "lr": 0.05, "epochs": 60, "early_stopping": None,
                      **train_cfg}}


def test_l1_leaves_more_near_zero_weights_than_none():
    def near_zero(model):
        return int((model.out.weight.abs() < 1e-2).sum())

    plain, _ = fit(wine_logreg())
    sparse, _ = fit(wine_logreg(l1=0.05))
    assert near_zero(sparse) > near_zero(plain) + 5


def test_l2_and_weight_decay_shrink_weights_but_not_biases():
    plain, _ = fit(wine_logreg())
    for setting in ({"l2": 0.5}, {"weight_decay": 0.5}, {"optimizer": "adamw",
                                                         "weight_decay": 0.5}):
        shrunk, _ = fit(wine_logreg(**setting))
        assert shrunk.out.weight.norm() < 0.7 * plain.out.weight.norm(), setting


def test_early_stopping_stops_and_restores_the_best_epoch():
    # a wide MLP on few rows with a high rate overfits quickly
    model, result = fit({"data": {"source": "builtin:breast_cancer"},
                         "model": {"source": "builtin:mlp", "hidden": [256, 256]},
                         "train": {"optimizer": "adam", "lr": 0.01, "epochs": 200,
                                   "early_stopping": {"patience": 5}}})
    history = result.history
    assert result.stopped == "early_stopping"
    assert len(history["epoch"]) < 200
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    assert result.best_epoch == history["epoch"][best]
    assert len(history["epoch"]) == result.best_epoch + 5
    # the model holds the best epoch's weights: its validation loss is the best one
    recipe = resolve({"data": {"source": "builtin:breast_cancer"}})
    data = load_data(recipe.data, seed=0)
    with torch.no_grad():
        val = torch.nn.functional.cross_entropy(model(torch.tensor(data.X_val)),
                                                torch.tensor(data.y_val))
    assert float(val) == pytest.approx(history["val_loss"][best], rel=1e-5)


def test_early_stopping_null_runs_every_epoch():
    _, result = fit(wine_logreg(epochs=7))
    assert result.history["epoch"] == list(range(1, 8)) and result.stopped == "completed"


def test_gradient_clipping_limits_the_first_step():
    moved = {}
    for clip in (None, 1e-3):
        recipe = wine_logreg(optimizer="sgd", lr=1.0, epochs=1, batch_size="full",
                             grad_clip=clip)
        model, _ = fit(recipe)
        fresh = build_model(resolve(recipe).model, (13,), 3, seed=0)
        with torch.no_grad():  # every parameter, biases too: clipping uses the global norm
            moved[clip] = float(torch.cat([(a - b).flatten() for a, b in zip(
                model.parameters(), fresh.parameters(), strict=True)]).norm())
    # one full-batch step at lr 1.0 moves the parameters by the clipped gradient's norm
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[None] > 10 * moved[1e-3]


def test_freeze_keeps_named_layers_fixed():
    recipe = {"data": {"source": "builtin:iris"},
              "model": {"source": "builtin:mlp", "hidden": [8]},
              "train": {"epochs": 5, "freeze": ["fc1"], "early_stopping": None}}
    model, _ = fit(recipe)
    fresh = build_model(resolve(recipe).model, (4,), 3, seed=0)
    assert torch.equal(model.fc1.weight, fresh.fc1.weight)
    assert not torch.equal(model.out.weight, fresh.out.weight)
    with pytest.raises(UserError, match="fc1"):
        fit({**recipe, "train": {"freeze": ["fc9"]}})


def test_divergence_stops_with_a_suggestion_and_keeps_the_history(tmp_path):
    recipe = {"data": {"source": "builtin:diabetes", "standardize": False},
              "model": {"source": "builtin:mlp"},
              "train": {"optimizer": "sgd", "lr": 10.0, "epochs": 20, "early_stopping": None}}
    with pytest.raises(TrainingDivergedError, match="learning rate") as info:
        engine.run(recipe, out_dir=tmp_path)
    history = info.value.result["variants"][0]["history"]
    assert len(history["epoch"]) < 20
    assert all(math.isfinite(v) for v in history["train_loss"])
    assert (tmp_path / "result.json").is_file()


def test_same_recipe_and_seed_give_the_same_metrics():
    recipe = {"seed": 3, "data": {"source": "builtin:digits"},
              "model": {"source": "builtin:mlp", "hidden": [32], "dropout": 0.2},
              "train": {"epochs": 3}}
    a = engine.run(recipe)["variants"][0]
    b = engine.run(recipe)["variants"][0]
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    for key in ("test_accuracy", "test_loss", "val_loss"):
        assert a["metrics"][key] == b["metrics"][key]
    c = engine.run({**recipe, "seed": 4})["variants"][0]
    assert c["history"]["train_loss"] != a["history"]["train_loss"]
