"""Weight sharing: per-layer k-means on the weights (Han, Mao & Dally, Deep Compression).

Each Linear or Conv layer's non-zero weights are clustered into at most 2^bits groups and
every weight is replaced by its group's centroid, so the layer stores a small codebook and
one `bits`-wide index per weight (Huffman-coded in the shipped file when asked). Centroids
start evenly spaced over [min, max] ("linear initialization", which Han et al. found best:
it keeps the rare large weights represented). Exact zeros are left out of the clustering
and stay zero, so a pruned model stays pruned. Biases are not shared.

Fine-tuning keeps the sharing: after every optimizer step each cluster's members are set
to the mean of their updated values. With plain SGD that is Han et al.'s centroid update
with the mean of the members' gradients instead of their sum (a learning rate divided by
the cluster's size); with Adam or momentum the per-weight optimizer state makes it an
approximation of that update, and the sharing holds exactly either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.compress.base import (
    COMPRESSORS,
    CompressContext,
    StepResult,
    clone,
    layer_widths,
    prunable,
    widths_text,
)
from engine.compress.capabilities import flat_graph
from engine.compress.correct import CORRECT, correct_step
from engine.errors import UserError
from engine.registry import Param


def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each value's nearest centroid (1-D: cut at the midpoints of sorted ones)."""
    order = np.argsort(centroids, kind="stable")
    cuts = (centroids[order][1:] + centroids[order][:-1]) / 2
    return order[np.searchsorted(cuts, values)]


def kmeans_1d(values: np.ndarray, k: int, *,
              iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, labels) of Lloyd's k-means on 1-D `values`, centroids initialized
    linearly over [min, max]; an emptied cluster keeps its centroid."""
    centroids = np.linspace(values.min(), values.max(), k)
    for _ in range(iterations):
        labels = _nearest(values, centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    labels = _nearest(values, centroids)
    return centroids, labels


@dataclass
class _Clusters:
    """One layer's sharing: which flat positions belong to which cluster; zeros apart."""

    weight: torch.Tensor  # the layer's weight parameter, updated in place
    members: torch.Tensor  # flat indices of the shared (non-zero) weights
    labels: torch.Tensor  # cluster of each member
    sizes: torch.Tensor  # members per cluster (float, at least 1)
    zeros: torch.Tensor  # flat indices of the weights that stay exactly zero

    def snap(self) -> None:
        """Set every member to its cluster's mean and the zeros back to zero."""
        with torch.no_grad():
            flat = self.weight.view(-1)
            sums = torch.zeros_like(self.sizes).index_add_(0, self.labels, flat[self.members])
            flat[self.members] = (sums / self.sizes)[self.labels]
            flat[self.zeros] = 0


def share_layer(weight: torch.Tensor, bits: int) -> _Clusters | None:
    """Cluster `weight`'s non-zero values in place into at most 2^bits shared values;
    None when the layer has no non-zero weight."""
    flat = weight.detach().view(-1)
    nonzero = flat != 0
    values = flat[nonzero].double().cpu().numpy()
    if values.size == 0:
        return None
    k = min(2 ** bits, len(np.unique(values)))
    centroids, labels = kmeans_1d(values, k)
    device = weight.device
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=device)
    members = nonzero.nonzero().squeeze(1)
    with torch.no_grad():
        flat[members] = torch.as_tensor(centroids, dtype=flat.dtype, device=device)[labels_t]
    sizes = torch.bincount(labels_t, minlength=k).to(flat.dtype).clamp_min(1)
    return _Clusters(weight, members, labels_t, sizes, (~nonzero).nonzero().squeeze(1))


@COMPRESSORS.register(
    "share", "Weight sharing: k-means clusters each layer's weights into 2^bits shared "
    "values, so each weight is stored as a short index (Han et al.'s Deep Compression).",
    params=(
        Param("bits", "int", 5, "index width: 2^bits shared values per layer", low=1, high=8),
        Param("layer_bits", "dict", {}, "mixed precision: {layer name: bits} for the layers "
              "that take another width than `bits` (an auto-compress search sets it from "
              "each layer's sensitivity)"),
        Param("huffman", "bool", True, "Huffman-code the cluster indices in the shipped file"),
        CORRECT,
        Param("finetune_epochs", "int", 3, "epochs of centroid fine-tuning", low=0, high=1000),
    ))
def share(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Share the weights of a copy of `model`, then fine-tune the centroids; `model` is
    unchanged."""
    if not prunable(model):
        raise UserError(flat_graph("share"))
    shared = clone(model)
    clusters: list[_Clusters] = []
    notes: list[str] = []
    widths = layer_widths(shared, step, low=1)
    for name, layer in prunable(shared):
        found = share_layer(layer.weight, widths[name])
        if found is None:
            notes.append(f"{name}: kept (every weight is zero).")
            continue
        clusters.append(found)
        notes.append(f"{name}: {len(found.sizes)} clusters for {len(found.members):,} "
                     f"non-zero weights.")
    if not clusters:
        return StepResult(model=shared, notes=notes, huffman=step["huffman"])

    def snap_all(_: nn.Module) -> None:
        for c in clusters:
            c.snap()

    notes += correct_step(shared, model, step, ctx, scale_weights=False,
                          when="before fine-tuning")
    history = ctx.finetune(shared, step["finetune_epochs"], variant="share",
                           after_step=snap_all)
    coding = "Huffman-coded" if step["huffman"] else "fixed-width"
    notes.append(f"Each weight is stored as a {coding} index of at most {widths_text(widths)} "
                 f"into its layer's codebook; biases stay float32.")
    return StepResult(model=shared, history=history or None, notes=notes,
                      huffman=step["huffman"])
