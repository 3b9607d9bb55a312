"""Diagnostics: is the model under- or over-fitting, and what should change?

Every diagnostic trains fresh models of the recipe's architecture on parts of the training
data (learning curves, bootstrap rounds) or at other settings (validation curves), so it
shares two helpers: `fit_fresh` for one model and `fit_many` for many at once, which trains
them as a batched ensemble where they share an architecture (engine/ensemble.py) and one
after another where they do not. The preprocessing fitted on the whole training part is
reused, so the curves compare models, not scalers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.recipe import Recipe

if TYPE_CHECKING:
    from engine.ensemble import EnsembleResult, Member


def subset(data: DataBundle, idx: np.ndarray) -> DataBundle:
    """The bundle with its training part cut to the rows `idx` (validation and test kept)."""
    return dataclasses.replace(data, X_train=data.X_train[idx], y_train=data.y_train[idx])


def fit_fresh(recipe: Recipe, data: DataBundle, idx: np.ndarray | None = None, *, seed: int,
              device: torch.device | None = None, model: dict[str, Any] | None = None,
              train: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialized model trained on the training rows `idx` (all when None).

    `model` and `train` override recipe sections (a validation curve's width, say); the
    seed sets the initialization, the batch order and dropout. Returns the model in
    evaluation mode on `device` (the CPU by default)."""
    from engine.models import build_model, set_training
    from engine.train import train as run_training

    device = device or torch.device("cpu")
    raw = recipe.to_dict()
    raw["model"] = {**raw["model"], **(model or {})}
    raw["train"] = {**raw["train"], **(train or {})}
    checked = Recipe.from_dict(raw)
    part = data if idx is None else subset(data, idx)
    n_out = data.n_classes if data.task == "classification" else 1
    net = build_model(checked.model, data.input_shape, n_out, seed=seed).to(device)
    run_training(net, part, checked.train, device=device, seed=seed)
    set_training(net, False)
    return net


def fit_many(recipe: Recipe, data: DataBundle, members: Sequence[Member], *,
             device: torch.device | None = None,
             on_member: Callable[[int, int], None] | None = None) -> EnsembleResult:
    """Fresh models for every member (its rows, seed and overrides), batched where they
    share an architecture; `result.summary()` says which path each took."""
    from engine.ensemble import fit_members

    return fit_members(recipe, data, members, device=device, on_member=on_member)


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Raw outputs (class logits, or predictions of shape (n,) for regression)."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    out = model(torch.as_tensor(X, dtype=torch.float32, device=device)).float().cpu().numpy()
    return out.reshape(len(X)) if out.ndim == 2 and out.shape[1] == 1 else out


def score(model: nn.Module, X: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy (classification) or R² (regression): the score every curve plots."""
    out = predict(model, X)
    if task == "classification":
        return float((out.argmax(1) == y).mean())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - out) ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0
