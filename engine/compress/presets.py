"""Presets: published pipelines of several techniques, run as one step.

`deep_compression` is Han, Mao & Dally (2016) without its retraining-from-scratch details:
magnitude pruning with fine-tuning, then k-means weight sharing with centroid fine-tuning,
shipped with Huffman-coded indices. Each stage is the registered technique itself, so the
preset and a two-step chain give the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from engine.compress import prune as _prune  # noqa: F401 - registers "prune"
from engine.compress import share as _share  # noqa: F401 - registers "share"
from engine.compress.base import COMPRESSORS, CompressContext, StepResult
from engine.registry import Param


def concat_histories(*histories: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
    """One history from consecutive stages: epochs and elapsed time continue counting."""
    merged: dict[str, list[float]] = {}
    for history in histories:
        if not history or not history.get("epoch"):
            continue
        epochs = merged.get("epoch", [])
        offset = {"epoch": epochs[-1] if epochs else 0,
                  "time_s": merged["time_s"][-1] if merged.get("time_s") else 0.0}
        for key, values in history.items():
            merged.setdefault(key, []).extend(v + offset.get(key, 0) for v in values)
    return merged or None


def _one_progress(ctx: CompressContext, variant: str, offsets: dict[str, int],
                  total: int) -> CompressContext:
    """A context whose stages report as one variant with one running epoch count."""
    def report(event: dict[str, Any]) -> None:
        stage = event.get("variant")
        if event.get("event") == "epoch" and stage in offsets:
            event = {**event, "epoch": event["epoch"] + offsets[stage], "epochs": total}
        ctx.on_progress({**event, "variant": variant, "stage": stage})

    return dataclasses.replace(ctx, on_progress=report)


@COMPRESSORS.register(
    "deep_compression", "Deep Compression (Han et al.): magnitude pruning, then k-means "
    "weight sharing, shipped with Huffman-coded weights, in one step.", params=(
        Param("amount", "float", 0.9, "fraction of each layer's weights pruned",
              low=0.0, high=0.99),
        Param("bits", "int", 5, "weight sharing: 2^bits shared values per layer",
              low=1, high=8),
        Param("prune_epochs", "int", 20, "fine-tuning epochs after pruning", low=0, high=1000),
        Param("share_epochs", "int", 5, "centroid fine-tuning epochs after sharing",
              low=0, high=1000),
    ))
def deep_compression(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Prune a copy of `model`, then share its weights; `model` is unchanged."""
    prune, share = COMPRESSORS.get("prune"), COMPRESSORS.get("share")
    inner = _one_progress(ctx, "deep_compression", {"prune": 0, "share": step["prune_epochs"]},
                          step["prune_epochs"] + step["share_epochs"])
    pruned = prune.fn(model, prune.resolve(
        {"method": "magnitude", "scope": "layer", "amount": step["amount"],
         "finetune_epochs": step["prune_epochs"]}, "compress"), inner)
    shared = share.fn(pruned.model, share.resolve(
        {"bits": step["bits"], "huffman": True, "finetune_epochs": step["share_epochs"]},
        "compress"), inner)
    notes = [f"Pruning: {n}" for n in pruned.notes] + [f"Sharing: {n}" for n in shared.notes]
    return StepResult(model=shared.model, history=concat_histories(pruned.history,
                                                                   shared.history),
                      notes=notes, huffman=True)
