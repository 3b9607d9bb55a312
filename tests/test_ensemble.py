"""Batched ensembles: each member trains as it would alone, and every path runs on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import load_data
from engine.diagnostics.bias_variance import bias_variance, bootstrap_samples
from engine.ensemble import Member, fit_members
from engine.recipe import Recipe
from engine.runner import resolve


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(source: str = "builtin:digits", model: dict | None = None, **train) -> Recipe:
    return resolve({"data": {"source": source},
                             "model": model or {"source": "builtin:mlp", "hidden": [16]},
                             "train": {"epochs": 4, "early_stopping": None, **train}})


@pytest.fixture(scope="module")
def digits():
    recipe = _recipe()
    return load_data(recipe.data, seed=0)


def _both(recipe: Recipe, data, members: list[Member]):
    batched = fit_members(recipe, data, members)
    alone = fit_members(recipe, data, members, batched=False)
    assert batched.paths == ["batched"] * len(members), batched.reasons
    assert alone.paths == ["sequential"] * len(members)
    return batched, alone


def _close(a: list[float], b: list[float], rel: float = 1e-4) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(a, b, rtol=rel, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_full_batch_members_match_sequential_training(digits, optimizer: str) -> None:
    """Identical init, own bootstrap rows, own learning rate and decay: the same losses."""
    recipe = _recipe(optimizer=optimizer, batch_size="full", epochs=6, weight_decay=0.01,
                     schedule={"name": "cosine"})
    base = recipe.train.lr
    members = [Member(idx=idx, seed=10 + r, train={"lr": base * (1 + r), "weight_decay":
                                                   0.01 * r})
               for r, idx in enumerate(bootstrap_samples(len(digits.y_train), 4, 0))]
    batched, alone = _both(recipe, digits, members)
    for ours, theirs in zip(batched.fits, alone.fits, strict=True):
        _close(ours.history["train_loss"], theirs.history["train_loss"])
        _close(ours.history["val_loss"], theirs.history["val_loss"])
        assert ours.history["lr"] == pytest.approx(theirs.history["lr"])
    for a, b in zip(batched.models, alone.models, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_minibatch_members_draw_the_sequential_batch_order(digits) -> None:
    """Each member draws its batches from its own seed, as engine.train does."""
    recipe = _recipe(optimizer="adam", batch_size=64, l2=1e-3, l1=1e-4, grad_clip=1.0)
    members = [Member(idx=idx, seed=r) for r, idx in
               enumerate(bootstrap_samples(len(digits.y_train), 3, 1))]
    batched, alone = _both(recipe, digits, members)
    for ours, theirs in zip(batched.fits, alone.fits, strict=True):
        _close(ours.history["train_loss"], theirs.history["train_loss"], rel=1e-3)
        _close(ours.history["val_accuracy"], theirs.history["val_accuracy"], rel=1e-2)


def test_dropout_members_agree_in_distribution(digits) -> None:
    """Dropout masks differ from sequential training; the mean accuracy does not."""
    recipe = _recipe(model={"source": "builtin:mlp", "hidden": [32], "dropout": 0.3},
                     optimizer="adam", batch_size=64, epochs=8)
    members = [Member(seed=r) for r in range(6)]
    batched, alone = _both(recipe, digits, members)
    ours = np.mean([f.history["val_accuracy"][-1] for f in batched.fits])
    theirs = np.mean([f.history["val_accuracy"][-1] for f in alone.fits])
    assert ours > 0.85 and abs(ours - theirs) < 0.02


def test_per_member_early_stopping_epochs_and_schedules(digits) -> None:
    recipe = _recipe(optimizer="momentum", batch_size=128, epochs=12, lr=0.05,
                     early_stopping={"patience": 2}, schedule={"name": "plateau",
                                                              "patience": 1})
    members = [Member(seed=r, train={"epochs": e, "lr": lr}) for r, (e, lr) in
               enumerate([(12, 0.05), (5, 0.05), (12, 0.8), (3, 0.01)])]
    batched, alone = _both(recipe, digits, members)
    for ours, theirs in zip(batched.fits, alone.fits, strict=True):
        assert ours.stopped == theirs.stopped
        assert ours.best_epoch == theirs.best_epoch
        assert ours.history["epoch"] == theirs.history["epoch"]
        assert ours.history["lr"] == pytest.approx(theirs.history["lr"])
        _close(ours.history["val_loss"], theirs.history["val_loss"], rel=1e-3)


def test_regression_logreg_matches_sequential() -> None:
    recipe = _recipe("builtin:diabetes", model={"source": "builtin:logreg"}, optimizer="sgd",
                     batch_size=32, epochs=5)
    data = load_data(recipe.data, seed=0)
    members = [Member(idx=idx, seed=r) for r, idx in
               enumerate(bootstrap_samples(len(data.y_train), 3, 0))]
    batched, alone = _both(recipe, data, members)
    for ours, theirs in zip(batched.fits, alone.fits, strict=True):
        _close(ours.history["train_loss"], theirs.history["train_loss"], rel=1e-3)
        _close(ours.history["train_r2"], theirs.history["train_r2"], rel=1e-3)
        _close(ours.history["val_r2"], theirs.history["val_r2"], rel=1e-3)


def test_subsets_of_different_lengths_stack_when_asked(digits) -> None:
    """Per-member draws of equal size per step (minibatch) or padded rows (full batch)."""
    rng = np.random.default_rng(0)
    n = len(digits.y_train)
    members = [Member(idx=np.sort(rng.choice(n, size=size, replace=False)), seed=i)
               for i, size in enumerate([n // 2, 2 * n // 3, n])]
    for batch in (64, "full"):
        # minibatch: every member takes the same steps per epoch (the mean length's), so
        # the shorter subsets get a few more steps than alone; trained near convergence
        recipe = _recipe(optimizer="adam", batch_size=batch, epochs=6 if batch == "full"
                         else 15, lr=0.01 if batch == "full" else 0.005)
        mixed = fit_members(recipe, digits, members, mix_lengths=True)
        assert mixed.paths == ["batched"] * 3
        alone = fit_members(recipe, digits, members, batched=False)
        for ours, theirs in zip(mixed.fits, alone.fits, strict=True):
            a, b = ours.history["val_accuracy"][-1], theirs.history["val_accuracy"][-1]
            assert abs(a - b) < (0.001 if batch == "full" else 0.04), (batch, a, b)
        split = fit_members(recipe, digits, members)  # by default: one stack per length
        assert split.paths == ["sequential"] * 3


def test_unbatchable_members_fall_back_and_say_why(digits) -> None:
    cnn = _recipe(model={"source": "builtin:cnn", "channels": [4], "hidden": [8]}, epochs=1)
    out = fit_members(cnn, digits, [Member(seed=0), Member(seed=1)])
    assert out.path == "sequential" and "builtin:cnn is not batched" in out.reasons[0]
    lbfgs = _recipe(model={"source": "builtin:logreg"}, optimizer="lbfgs", batch_size="full",
                    epochs=2)
    out = fit_members(lbfgs, digits, [Member(seed=0), Member(seed=1)])
    assert out.path == "sequential" and "lbfgs" in out.reasons[0]
    # members of two widths: two stacks, and a lone member trains alone
    recipe = _recipe(epochs=1)
    out = fit_members(recipe, digits, [Member(seed=0), Member(seed=1),
                                       Member(seed=2, model={"hidden": [8]})])
    assert out.paths == ["batched", "batched", "sequential"] and out.path == "mixed"
    assert out.summary()["batched"] == 2 and "single member" in out.summary()["reasons"][0]
    assert [m.out.in_features for m in out.models] == [16, 16, 8]


def test_bias_variance_rounds_train_as_one_batched_ensemble(digits) -> None:
    recipe = _recipe(optimizer="adam", batch_size=64, epochs=3)
    calls = []
    bv = bias_variance(recipe, digits, rounds=4, seed=2,
                       on_round=lambda d, t: calls.append((d, t)))
    assert bv["training"]["path"] == "batched" and bv["training"]["batched"] == 4
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    from engine.metrics import predict
    from engine.train import fit_fresh

    def fit(idx, r):  # the sequential reference: one fresh model per round
        model, _ = fit_fresh(recipe, digits, idx, seed=2 + r)
        return lambda X: predict(model, X)

    alone = bias_variance(recipe, digits, rounds=4, seed=2, fit=fit)
    for key in ("expected_loss", "bias", "variance"):
        assert bv[key] == pytest.approx(alone[key], abs=0.01)
