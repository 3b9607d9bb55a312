"""The recipe contract: defaults filled, unknown keys and bad values refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.recipe import Recipe, load_recipe
from engine.runner import resolve

ASSETS = Path(__file__).parent.parent / "assets" / "recipes"


def test_defaults_are_filled_and_the_dump_replays():
    recipe = resolve({})
    d = recipe.to_dict()
    assert d["data"]["source"] == "builtin:digits"
    assert d["train"]["lr"] == 0.001  # adam's own default
    assert d["train"]["schedule"] == {"name": "constant", "warmup_epochs": 0,
                                      "warmup_start": 0.1}
    assert d["data"]["params"] == {}
    assert resolve(json.loads(json.dumps(d))) == recipe


def test_design_example_is_accepted_in_full():
    recipe = resolve({
        "seed": 0, "device": "auto",
        "data": {"source": "builtin:digits", "target": None, "task": "auto",
                 "val_fraction": 0.2, "test_fraction": 0.2, "standardize": True},
        "model": {"source": "builtin:mlp", "hidden": [128, 64], "dropout": 0.0},
        "train": {"optimizer": "adam", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0,
                  "l1": 0.0, "batch_size": 64, "epochs": 30, "schedule": {"name": "cosine"},
                  "early_stopping": {"patience": 5}},
        "tune": None, "diagnose": None, "export": {"onnx": False}})
    assert recipe.train.schedule.options == {"min_lr": 0.0}
    assert recipe.train.early_stopping.patience == 5


def test_schedule_settings_are_flat_and_checked():
    recipe = resolve({"train": {"schedule": {"name": "step", "gamma": 0.5}}})
    assert recipe.train.schedule.options == {"step_size": 10, "gamma": 0.5}
    assert recipe.to_dict()["train"]["schedule"]["gamma"] == 0.5
    with pytest.raises(UserError, match="gamma"):
        resolve({"train": {"schedule": {"name": "step", "gama": 0.5}}})
    assert resolve({"train": {"schedule": None}}).train.schedule is None


def test_dataset_params_are_filled_from_the_registry():
    recipe = resolve({"data": {"source": "builtin:moons", "params": {"noise": 0.3}}})
    assert recipe.data.params["noise"] == 0.3
    assert recipe.data.params["n_samples"] > 0


@pytest.mark.parametrize(("raw", "words"), [
    ({"trian": {}}, "did you mean 'train'"),
    ({"train": {"lrr": 0.1}}, "train.lrr"),
    ({"train": {"optimizer": "adm"}}, "did you mean 'adam'"),
    ({"train": {"lr": -1}}, "train.lr must be positive"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"batch_size": "half"}}, "train.batch_size"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"schedule": {"name": "cosin"}}}, "did you mean 'cosine'"),
    ({"data": {"source": "builtin:mnist"}}, "unknown dataset 'mnist'"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "at least 10%"),
    ({"data": {"standardize": "zscore"}}, "data.standardize"),
    ({"model": {"hidden": [64, -1]}}, "model.hidden"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"source": "builtin:resnet"}}, "unknown model 'resnet'"),
    ({"device": "tpu"}, "device must be"),
    ({"compress": [{"technique": "prunning"}]}, "did you mean 'prune'"),
    ({"compress": [{"amount": 0.5}]}, "'technique' key"),
    ([1, 2], "must be an object"),
])
def test_bad_recipes_get_one_clear_sentence(raw, words):
    with pytest.raises(UserError) as info:
        resolve(raw)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("path", sorted(ASSETS.glob("*")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    assert isinstance(load_recipe(path), Recipe)


def test_recipe_files_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="one JSON object"):
        load_recipe(tmp_path / "list.json")
