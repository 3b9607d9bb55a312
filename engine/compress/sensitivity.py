"""Per-layer sensitivity: how much each layer alone tolerates pruning, quantization, SVD.

For every Linear/Conv layer, one at a time, the score on the validation part after
magnitude-pruning that layer at several amounts, quantizing it at several bit widths and
factorizing it at several ranks, all without fine-tuning. The records form a matrix
(layer x setting) that the Compress page draws as a heatmap: a layer that keeps its score
at 90% pruning can be pruned hard; one that drops at 4 bits needs more.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from engine.compress.base import CompressContext, prunable
from engine.compress.lowrank import svd_factor
from engine.compress.prune import magnitude_mask
from engine.metrics import metric_name
from engine.quantizers import quantize_tensor


def sensitivity(model: nn.Module, ctx: CompressContext, cfg: Any) -> dict[str, Any]:
    """{"metric", "part", "baseline", "baseline_loss", "records": [{layer, technique,
    setting, score, loss}]}: the loss is the finer signal where the score moves by whole
    rows (mixed precision reads it)."""
    metric = metric_name(ctx.task)

    def score(m: nn.Module) -> dict[str, float]:
        found = ctx.evaluate(m, cfg.part)
        return {"score": found[metric], "loss": found["loss"]}

    records = []
    layers = prunable(model)
    for name, layer in layers:
        weight = layer.weight.detach()
        trials: list[tuple[str, str, Any]] = []
        for amount in cfg.amounts:
            trials.append(("prune", f"{amount:.0%}",
                           lambda w, a=amount: w * magnitude_mask(w, a)))
        for bits in cfg.bits:
            trials.append(("quantize", f"{bits}-bit",
                           lambda w, b=bits: quantize_tensor(w, b, "uniform", True)))
        for technique, setting, change in trials:
            with _swapped(layer, change(weight)):
                records.append({"layer": name, "technique": technique, "setting": setting,
                                **score(model)})
        small = min(weight.shape[0], weight[0].numel())
        for fraction in cfg.ranks:
            rank = max(1, round(fraction * small))
            trial = copy.deepcopy(model)
            _replace(trial, name, svd_factor(trial.get_submodule(name), rank))
            records.append({"layer": name, "technique": "lowrank",
                            "setting": f"rank {fraction:.0%}", **score(trial)})
    base = score(model)
    return {"metric": metric, "part": cfg.part, "baseline": base["score"],
            "baseline_loss": base["loss"], "records": records}


@contextlib.contextmanager
def _swapped(layer: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Temporarily replace a layer's weight values; restore them afterwards."""
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
