"""Hyperparameter search: samplers, k-fold validation, resuming, Pareto fronts, workers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from engine.errors import UserError
from engine.recipe import Recipe
from engine.runner import resolve
from engine.tune import apply_params, best_recipe, fold_indices, search, validate_tune


def make(tune: dict, *, source: str = "builtin:iris", epochs: int = 5) -> Recipe:
    recipe = resolve({"data": {"source": source}, "model": {"hidden": [8]},
                               "train": {"epochs": epochs, "early_stopping": None}})
    return recipe.replace(tune=validate_tune(tune))


def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/s.db"


def combo(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def test_grid_visits_exactly_the_grid_and_defaults_to_the_whole_grid(tmp_path):
    space = {"train.lr": [0.01, 0.1], "model.hidden": [[4], [8]]}
    seen = []
    result = search(make({"sampler": "grid", "space": space}), storage=url(tmp_path),
                    on_trial=seen.append)
    expected = {combo({"train.lr": lr, "model.hidden": h})
                for lr, h in itertools.product(*space.values())}
    assert len(result["trials"]) == 4
    assert {combo(t["params"]) for t in result["trials"]} == expected
    assert [t["number"] for t in seen] == [0, 1, 2, 3]
    assert all(t["state"] == "COMPLETE" for t in result["trials"])
    best = max(result["trials"], key=lambda t: t["values"][0])
    assert result["best_value"] == best["values"][0]
    assert result["history"][-1]["best_so_far"] == result["best_value"]
    trained = best_recipe(make({"sampler": "grid", "space": space}), result)
    assert trained.tune is None
    assert trained.train.lr == result["best_params"]["train.lr"]
    assert list(trained.model.hidden) == result["best_params"]["model.hidden"]


def test_kfold_validates_every_row_exactly_once():
    y = np.repeat([0, 1, 2], [40, 25, 15])
    for validation in ("kfold", "stratified"):
        splits = fold_indices(y, validation, 5, seed=0, task="classification")
        assert len(splits) == 5
        val = np.concatenate([va for _, va in splits])
        assert sorted(val.tolist()) == list(range(len(y)))  # disjoint, covering
        for tr, va in splits:
            assert not set(tr) & set(va)
            assert len(tr) + len(va) == len(y)
    overall = np.bincount(y) / len(y)
    for _, va in fold_indices(y, "stratified", 5, seed=0, task="classification"):
        share = np.bincount(y[va], minlength=3) / len(va)
        assert np.all(np.abs(share - overall) <= 0.1)
    with pytest.raises(UserError, match="stratified"):
        fold_indices(y.astype(float), "stratified", 5, seed=0, task="regression")


def test_kfold_search_scores_the_mean_over_folds(tmp_path, monkeypatch):
    import engine.tune.objective as tune_mod

    used = []
    real = tune_mod.fold_indices

    def spy(*args, **kwargs):
        splits = real(*args, **kwargs)
        used.append(splits)
        return splits

    monkeypatch.setattr(tune_mod, "fold_indices", spy)
    recipe = make({"sampler": "random", "n_trials": 2, "validation": "stratified",
                   "folds": 3, "space": {"train.lr": {"low": 0.01, "high": 0.1, "log": True}}})
    result = search(recipe, storage=url(tmp_path))
    assert len(used) == 2
    val = np.concatenate([va for _, va in used[0]])
    assert len(val) == len(set(val.tolist()))  # disjoint validation folds
    for t in result["trials"]:
        assert len(t["fold_scores"]) == 3
        assert t["values"][0] == pytest.approx(np.mean(t["fold_scores"]))
        assert t["std"] == pytest.approx(np.std(t["fold_scores"]))


def test_a_resumed_study_continues_from_its_trials(tmp_path):
    tune = {"sampler": "tpe", "n_trials": 3, "study": "again",
            "space": {"train.lr": {"low": 1e-3, "high": 0.3, "log": True}}}
    first = search(make(tune), storage=url(tmp_path))
    assert len(first["trials"]) == 3
    seen = []
    second = search(make({**tune, "n_trials": 5}), storage=url(tmp_path), on_trial=seen.append)
    assert len(second["trials"]) == 5
    assert second["trials"][:3] == first["trials"]
    assert [t["number"] for t in seen] == [3, 4]  # only the new ones are announced
    again = search(make({**tune, "n_trials": 5}), storage=url(tmp_path))
    assert len(again["trials"]) == 5  # already done: nothing more runs


def dominates(a: list[float], b: list[float]) -> bool:
    """Maximize the first value (score), minimize the second (params)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def test_nsga2_returns_only_non_dominated_trials(tmp_path):
    recipe = make({"sampler": "nsga2", "n_trials": 8, "objectives": ["val_score", "params"],
                   "space": {"model.hidden": [[2], [4], [8], [16]],
                             "train.lr": {"low": 1e-3, "high": 0.1, "log": True}}})
    result = search(recipe, storage=url(tmp_path))
    assert result["directions"] == ["maximize", "minimize"]
    pareto = result["pareto"]
    assert pareto and "best_value" not in result
    for a, b in itertools.permutations(pareto, 2):
        assert not dominates(a["values"], b["values"])
    complete = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    numbers = {p["number"] for p in pareto}
    for t in complete:  # every trial off the front is dominated by one on it
        if t["number"] not in numbers:
            assert any(dominates(p["values"], t["values"]) or p["values"] == t["values"]
                       for p in pareto)


@pytest.mark.parametrize("sampler", ["random", "tpe", "gp"])
def test_samplers_run(tmp_path, sampler):
    recipe = make({"sampler": sampler, "n_trials": 3, "seed": 1,
                   "space": {"train.lr": {"low": 1e-3, "high": 0.3, "log": True},
                             "train.optimizer": ["sgd", "adam"],
                             "train.batch_size": {"low": 16, "high": 64, "step": 16}}})
    result = search(recipe, storage=url(tmp_path))
    assert len(result["trials"]) == 3
    for t in result["trials"]:
        assert t["params"]["train.optimizer"] in ("sgd", "adam")
        assert t["params"]["train.batch_size"] in (16, 32, 48, 64)
        assert 1e-3 <= t["params"]["train.lr"] <= 0.3
    assert set(result["best_params"]) == {"train.lr", "train.optimizer", "train.batch_size"}


def test_median_pruning_stops_hopeless_trials(tmp_path):
    # lr spans five decades: the tiny rates are still near chance after a few epochs
    recipe = make({"sampler": "random", "n_trials": 10, "pruner": "median", "seed": 0,
                   "space": {"train.lr": {"low": 1e-6, "high": 0.1, "log": True}}},
                  epochs=8)
    seen = []
    result = search(recipe, storage=url(tmp_path), on_trial=seen.append)
    states = [t["state"] for t in result["trials"]]
    assert len(states) == 10 and set(states) <= {"COMPLETE", "PRUNED"}
    assert "COMPLETE" in states and "PRUNED" in states  # seeded: the same rates every time
    assert len(seen) == 10
    for t in result["trials"]:  # a pruned trial keeps its last reported score, if any
        assert t["state"] == "PRUNED" or len(t["values"]) == 1


def test_hyperband_with_kfold_runs(tmp_path):
    recipe = make({"sampler": "tpe", "n_trials": 3, "pruner": "hyperband",
                   "validation": "kfold", "folds": 2, "objectives": ["val_loss"],
                   "space": {"train.lr": {"low": 1e-3, "high": 0.1, "log": True}}})
    result = search(recipe, storage=url(tmp_path))
    assert result["directions"] == ["minimize"]
    assert len(result["trials"]) == 3


def test_validate_tune_fills_defaults_and_is_idempotent():
    tune = validate_tune({"space": {"train.lr": {"low": 1e-4, "high": 0.1, "log": True}}})
    assert tune["sampler"] == "tpe" and tune["n_trials"] == 20 and tune["workers"] == 1
    assert tune["validation"] == "holdout" and tune["folds"] == 5 and tune["pruner"] == "none"
    assert tune["objectives"] == ["val_score"]
    assert tune["space"]["train.lr"] == {"low": 1e-4, "high": 0.1, "log": True, "step": None,
                                         "type": "float"}
    assert validate_tune(tune) == tune
    assert validate_tune({"sampler": "grid", "space": {"train.lr": [0.1]}})["n_trials"] is None
    design = validate_tune({"cv": {"folds": 3, "stratified": True}, "objectives":
                            ["val_accuracy"], "space": {"model.hidden": [[8], [16]]}})
    assert design["validation"] == "stratified" and design["folds"] == 3
    assert design["objectives"] == ["val_score"]
    hidden = validate_tune({"space": {"model.dropout": {"low": 0, "high": 1}}})
    assert hidden["space"]["model.dropout"]["type"] == "int"  # ints unless told otherwise


@pytest.mark.parametrize(("tune", "match"), [
    ({"sampler": "bayes", "space": {"train.lr": [0.1]}}, "tune.sampler"),
    ({"space": {"train.speed": [0.1]}}, "train.speed"),
    ({"space": {"optimizer.lr": [0.1]}}, "optimizer.lr"),
    ({"space": {"compress.x.amount": [0.5]}}, "compress"),
    ({"sampler": "grid", "space": {"train.lr": {"low": 0.01, "high": 0.1}}}, "grid"),
    ({"sampler": "grid", "objectives": ["val_score", "params"], "space": {"train.lr": [0.1]}},
     "objectives"),
    ({"sampler": "gp", "objectives": ["val_score", "latency_ms"],
      "space": {"train.lr": [0.1]}}, "objectives"),
    ({"objectives": ["accuracy"], "space": {"train.lr": [0.1]}}, "objectives"),
    ({"n_trials": 0, "space": {"train.lr": [0.1]}}, "n_trials"),
    ({"workers": 0, "space": {"train.lr": [0.1]}}, "workers"),
    ({"folds": 1, "space": {"train.lr": [0.1]}}, "folds"),
    ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "low"),
    ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "log"),
    ({"space": {}}, "space"),
    ({"pruner": "median", "objectives": ["val_score", "params"],
      "space": {"train.lr": [0.1]}}, "pruner"),
    ({"trials": 5, "space": {"train.lr": [0.1]}}, "tune.trials"),
])
def test_validate_tune_rejects(tune, match):
    with pytest.raises(UserError, match=match):
        validate_tune(tune)


def test_bad_values_are_refused_before_any_trial(tmp_path):
    with pytest.raises(UserError, match=r"train\.optimizer"):
        search(make({"space": {"train.optimizer": ["adam", "warp"]}}), storage=url(tmp_path))
    with pytest.raises(UserError, match="compression step 2"):
        search(make({"space": {"compress.2.amount": [0.5]}}), storage=url(tmp_path))


def test_apply_params_sets_paths_without_touching_the_input():
    raw = resolve({"compress": [{"technique": "prune", "amount": 0.5}]}).to_dict()
    out = apply_params(raw, {"train.lr": 0.3, "model.hidden": [4], "compress.0.amount": 0.9})
    assert out["train"]["lr"] == 0.3 and out["model"]["hidden"] == [4]
    assert out["compress"][0]["amount"] == 0.9
    assert raw["compress"][0]["amount"] == 0.5 and raw["train"]["lr"] != 0.3
    assert resolve(out).compress[0]["amount"] == 0.9


def test_compression_settings_are_tuned(tmp_path):
    recipe = resolve({"data": {"source": "builtin:iris"}, "model": {"hidden": [8]},
                               "train": {"epochs": 5, "early_stopping": None},
                               "compress": [{"technique": "prune", "amount": 0.5,
                                             "finetune_epochs": 0}]})
    recipe = recipe.replace(tune=validate_tune({
        "sampler": "grid", "objectives": ["val_score"],
        "space": {"compress.0.amount": [0.2, 0.9]}}))
    result = search(recipe, storage=url(tmp_path))
    assert {t["params"]["compress.0.amount"] for t in result["trials"]} == {0.2, 0.9}
    assert best_recipe(recipe, result).compress[0]["amount"] in (0.2, 0.9)


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path):
    recipe = make({"sampler": "random", "n_trials": 4, "workers": 2, "study": "shared",
                   "space": {"train.lr": {"low": 1e-3, "high": 0.1, "log": True}}})
    seen = []
    result = search(recipe, storage=url(tmp_path), on_trial=seen.append)
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 4
    assert sorted(t["number"] for t in seen) == [0, 1, 2, 3]
    assert len({t["params"]["train.lr"] for t in result["trials"]}) == 4  # distinct seeds


@pytest.mark.parametrize("batch_size", ["full", 16])
def test_kfold_folds_train_as_one_batched_ensemble_like_one_after_another(
        tmp_path, monkeypatch, batch_size):
    import engine.tune.objective as objective

    tune = {"sampler": "random", "n_trials": 2, "seed": 3, "validation": "kfold", "folds": 4,
            "space": {"train.lr": {"low": 0.01, "high": 0.1, "log": True}}}

    def fold_scores(study: str) -> list[list[float]]:
        recipe = resolve({
            "data": {"source": "builtin:iris"}, "model": {"hidden": [8]},
            "train": {"epochs": 15, "early_stopping": None, "optimizer": "sgd",
                      "batch_size": batch_size}}).replace(
            tune=validate_tune({**tune, "study": study}))
        result = search(recipe, storage=url(tmp_path))
        trials = sorted(result["trials"], key=lambda t: t["number"])
        paths.update(t["folds_trained"] for t in trials)
        return [t["fold_scores"] for t in trials]

    paths: set[str] = set()
    batched = fold_scores("batched")
    assert paths == {"batched"}
    monkeypatch.setattr(objective, "blocker", lambda recipe: "switched off for the test")
    paths.clear()
    sequential = fold_scores("sequential")
    assert paths == {"one after another"}
    for b, s in zip(batched, sequential, strict=True):
        if batch_size == "full":  # the same updates: the same models to float rounding
            assert b == pytest.approx(s, abs=1e-6)
        else:  # unequal folds draw their batches differently: equal in distribution
            assert np.mean(b) == pytest.approx(np.mean(s), abs=0.08)


def test_trials_rank_best_first_and_the_winner_reads_as_settings():
    from engine.tune import ranked_trials, winner

    tuning = {"objectives": ["val_loss"], "directions": ["minimize"],
              "best_params": {"train.lr": 0.012345678, "model.hidden": [64, 32]},
              "trials": [{"number": 0, "state": "COMPLETE", "values": [0.5],
                          "params": {"train.lr": 0.1, "model.hidden": [8]}},
                         {"number": 1, "state": "PRUNED", "values": None, "params": {}},
                         {"number": 2, "state": "COMPLETE", "values": [0.2], "std": 0.01,
                          "params": {"train.lr": 0.01, "model.hidden": [64, 32]}}]}
    rows = ranked_trials(tuning)
    assert [r["trial"] for r in rows] == [2, 0]  # lowest loss first; the pruned one left out
    assert rows[0]["model.hidden"] == "[64, 32]" and rows[0]["std over folds"] == 0.01
    assert winner(tuning) == "train.lr = 0.01235 · model.hidden = [64, 32]"
