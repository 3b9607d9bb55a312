"""All the diagnostics a recipe's `diagnose` section asks for, and the verdict they support."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.diagnostics.bias_variance import bias_variance
from engine.diagnostics.curves import learning_curve, rademacher, validation_curve
from engine.diagnostics.landscape import loss_landscape
from engine.diagnostics.verdict import diagnose
from engine.metrics import metric_name, score
from engine.models import complexity
from engine.recipe import Recipe


def run_diagnostics(recipe: Recipe, data: DataBundle, model: nn.Module, *,
                    device: torch.device,
                    emit: Callable[[dict[str, Any]], None] = lambda e: None) -> dict[str, Any]:
    """result["diagnostics"]: scores, curves, decomposition, complexity, verdict."""
    cfg = recipe.diagnose
    metric = metric_name(data.task)

    def stage(what: str) -> Callable[[int, int], None]:
        def step(done: int, total: int) -> None:
            emit({"event": "stage", "stage": "diagnose", "message": f"{what}: {done} of "
                  f"{total}", "done": done, "total": total})
        step(0, 1)
        return step

    out: dict[str, Any] = {"metric": metric, "scores": {
        "train": score(model, data.X_train, data.y_train, data.task),
        "val": score(model, data.X_val, data.y_val, data.task) if len(data.y_val) else None}}
    if cfg.learning_curve is not None:
        lc = cfg.learning_curve
        out["learning_curve"] = learning_curve(
            recipe, data, fractions=lc.fractions, repeats=lc.repeats, seed=recipe.seed,
            on_step=stage("learning curve"))
    if cfg.validation_curve is not None:
        vc = cfg.validation_curve
        out["validation_curve"] = validation_curve(
            recipe, data, param=vc.param, values=list(vc.values), repeats=vc.repeats,
            seed=recipe.seed, on_step=stage("validation curve"))
    if cfg.bias_variance is not None:
        out["bias_variance"] = bias_variance(recipe, data, rounds=cfg.bias_variance.rounds,
                                             seed=recipe.seed,
                                             on_round=stage("bias-variance rounds"))
    if cfg.complexity:
        stage("complexity")
        out["complexity"] = {**complexity(model, data.input_shape),
                             "rademacher": rademacher(recipe, data, seed=recipe.seed)}
    if cfg.landscape is not None:
        stage("loss landscape")
        ls = cfg.landscape
        out["landscape"] = loss_landscape(model, data, points=ls.points, span=ls.span,
                                          two_d=ls.two_d, seed=recipe.seed)
    chance = None
    if data.task == "classification" and len(data.y_val):
        chance = float(np.bincount(data.y_val).max() / len(data.y_val))
    if out["scores"]["val"] is not None:
        out.update(diagnose(out["scores"]["train"], out["scores"]["val"], task=data.task,
                            learning_curve=out.get("learning_curve"),
                            bias_variance=out.get("bias_variance"), baseline_score=chance))
    return out
