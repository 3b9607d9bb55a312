"""`engine.run`: a recipe in, a trained model and a result out.

The result follows DESIGN.md: the recipe with every default filled in, the device, and one
record per variant (only the baseline until compression steps exist) with its metrics and
per-epoch history. With `out_dir` the result is written to `out_dir/result.json` and each
variant's model to `out_dir/<variant>.pt2`; `size_bytes` is that file's size.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError
from engine.recipe import Recipe, as_recipe
from engine.train import ProgressFn, evaluate, resolve_device, to_tensors, train


class TrainingDivergedError(UserError):
    """Training stopped on a NaN or infinite loss; `result` keeps the history so far."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def run(recipe: Recipe | dict[str, Any] | str | Path, *, out_dir: str | Path | None = None,
        on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run a recipe end to end and return its result (see DESIGN.md for the keys)."""
    from engine.data import load_data
    from engine.latency import machine, torch_latency
    from engine.models import build_model, complexity, save_model

    recipe = as_recipe(recipe)
    emit = on_progress or (lambda event: None)
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    emit({"event": "stage", "stage": "data", "message": "loading the data"})
    data = load_data(recipe.data, seed=recipe.seed)
    n_out = data.n_classes if data.task == "classification" else 1
    model = build_model(recipe.model, data.input_shape, n_out, seed=recipe.seed).to(device)
    tensors = to_tensors(data, device)
    emit({"event": "stage", "stage": "train", "message": f"training on {device.type}",
          "epochs": recipe.train.epochs})
    fit = train(model, data, recipe.train, device=device, seed=recipe.seed,
                augment_cfg=recipe.data.augment, tensors=tensors,
                on_progress=lambda event: emit({**event, "variant": "baseline"}))

    metrics: dict[str, Any] = {}
    for part in ("train", "val", "test"):
        scores = evaluate(model, tensors[f"X_{part}"], tensors[f"y_{part}"], data.task)
        metrics.update({f"{part}_{k}": v for k, v in scores.items()})
    metrics.update(complexity(model, data.input_shape))
    metrics["latency_ms"] = torch_latency(model, data.input_shape)["median_ms"]
    metrics["epochs_run"] = len(fit.history["epoch"])
    metrics["best_epoch"] = fit.best_epoch
    metrics["train_time_s"] = fit.seconds

    variant = {"name": "baseline", "technique": None, "metrics": metrics,
               "history": fit.history, "stopped": fit.stopped}
    result = {
        "recipe": recipe.to_dict(),
        "device": str(device),
        "machine": machine(),
        "data": data.summary(),
        "variants": [variant],
        "tuning": None,
        "diagnostics": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if fit.stopped == "diverged":
        variant["error"] = fit.message
        if out_dir is not None:
            write_result(result, out_dir)
        raise TrainingDivergedError(fit.message, result)

    emit({"event": "stage", "stage": "save", "message": "saving the model"})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "baseline.pt2"
        metrics["size_bytes"] = save_model(model, data.input_shape, path)
        if out_dir is not None:
            variant["model_file"] = path.name
            write_result(result, out_dir)
    emit({"event": "variant", "name": "baseline", "technique": None, "metrics": metrics,
          "model_file": variant.get("model_file")})
    emit({"event": "done"})
    return result


def write_result(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `result.json` (NaN, which JSON lacks, is written as null)."""
    path = Path(out_dir) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2), encoding="utf-8")
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
