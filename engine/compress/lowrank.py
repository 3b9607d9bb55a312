"""Low-rank factorization: each Linear or Conv layer becomes two thinner ones.

A weight matrix W (out x in; a convolution's kernel reshaped to out x in·k) is written as
A·B with A (out x r) and B (r x in), and the layer becomes `B` then `A`: Linear(in, r) then
Linear(r, out), or a Conv(in, r, k) with the layer's stride and padding then a 1x1
Conv(r, out). `svd` truncates the SVD (the best rank-r fit, Eckart-Young), splitting the
singular values evenly, A = U_r √S_r and B = √S_r V_rᵀ, so both factors have the same scale.
`nmf` is semi-NMF (Ding, Li & Jordan 2010): W ≈ F Gᵀ with G ≥ 0 and F free, which allows
mixed-sign weights; it fits worse than the SVD but gives the first factor non-negative
weights. A layer is only factorized when r·(in + out) < in·out, i.e. when it saves
parameters. The factorized layer keeps its name (fc1 becomes a `Factorized` pair "fc1.0", "fc1.1").
"""

from __future__ import annotations

import math

import torch
from sklearn.cluster import KMeans
from torch import nn

from engine.architectures import LAYER_ATTRS, Factorized
from engine.compress.base import COMPRESSORS, CompressContext, StepResult, clone, prunable
from engine.compress.capabilities import flat_graph
from engine.compress.correct import CORRECT, correct_step
from engine.errors import UserError
from engine.registry import Param


def _matrix(layer: nn.Module) -> torch.Tensor:
    if getattr(layer, "groups", 1) != 1:
        raise ValueError("grouped convolutions are not factorized")
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1).double()


def _replacement(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> Factorized:
    """The two layers B then A standing in for `layer` (bias on the second)."""
    weight = layer.weight
    out, r = A.shape
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, r, bias=False)
        second = nn.Linear(r, out, bias=has_bias)
    else:
        conv = type(layer)
        first = conv(layer.in_channels, r, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, bias=False,
                     padding_mode=layer.padding_mode)
        second = conv(r, out, 1, bias=has_bias)
    first.weight = nn.Parameter(B.reshape(r, *weight.shape[1:]).to(weight).contiguous())
    second.weight = nn.Parameter(A.reshape(out, r, *[1] * (weight.ndim - 2)).to(weight)
                                 .contiguous())
    if has_bias:
        second.bias = nn.Parameter(layer.bias.detach().clone())
    kept = {a: getattr(layer, a) for a in LAYER_ATTRS if hasattr(layer, a)}
    return Factorized(first, second, **kept).to(weight.device)


def svd_factor(layer: nn.Module, rank: int) -> nn.Module:
    """The rank-`rank` SVD factorization of a Linear or Conv layer, as a two-layer `Factorized` pair
    (pure: `layer` is left as it is)."""
    U, S, Vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    r = max(1, min(rank, len(S)))
    root = S[:r].sqrt()
    return _replacement(layer, U[:, :r] * root, root[:, None] * Vh[:r])


def semi_nmf(W: torch.Tensor, rank: int, *, iterations: int = 200,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, G) with W ≈ F Gᵀ and G ≥ 0, by Ding et al.'s multiplicative updates; G starts
    from a k-means clustering of W's columns plus 0.2, as in the paper."""
    n = W.shape[1]
    k = min(rank, n)
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(W.T.cpu().numpy())
    G = torch.full((n, k), 0.2, dtype=W.dtype)
    G[torch.arange(n), torch.as_tensor(labels, dtype=torch.long)] += 1.0

    def pos(M: torch.Tensor) -> torch.Tensor:
        return (M.abs() + M) / 2

    def neg(M: torch.Tensor) -> torch.Tensor:
        return (M.abs() - M) / 2

    eps = 1e-12
    for _ in range(iterations):
        F = W @ G @ torch.linalg.pinv(G.T @ G)
        WtF, FtF = W.T @ F, F.T @ F
        G = G * ((pos(WtF) + G @ neg(FtF)) / (neg(WtF) + G @ pos(FtF) + eps)).sqrt()
    F = W @ G @ torch.linalg.pinv(G.T @ G)
    return F, G


def choose_rank(S: torch.Tensor, *, rank_fraction: float, energy: float) -> int:
    """The smallest rank keeping `energy` of Σ S² when energy > 0, else rank_fraction of the
    full rank (rounded, at least 1)."""
    if energy > 0:
        kept = (S ** 2).cumsum(0) / (S ** 2).sum().clamp_min(1e-30)
        return min(len(S), int((kept < energy).sum()) + 1)
    return max(1, round(rank_fraction * len(S)))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@COMPRESSORS.register(
    "lowrank", "Low-rank factorization: replace each large layer by two thinner ones whose "
    "product approximates its weights (truncated SVD or semi-NMF).", params=(
        Param("method", "str", "svd", "svd: best fit; nmf: semi-NMF, non-negative first "
              "factor", choices=("svd", "nmf")),
        Param("rank_fraction", "float", 0.25, "rank kept, as a fraction of each layer's full "
              "rank", low=0.01, high=1.0),
        Param("energy", "float", 0.0, "when above 0: per layer, the smallest rank keeping "
              "this fraction of the squared singular values (overrides rank_fraction)",
              low=0.0, high=0.9999),
        CORRECT,
        Param("finetune_epochs", "int", 3, "fine-tuning epochs after factorizing",
              low=0, high=1000),
    ))
def lowrank(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Factorize a copy of `model` layer by layer, then fine-tune it; `model` is unchanged."""
    if not prunable(model):
        raise UserError(flat_graph(f"lowrank {step['method']}"))
    compact = clone(model)
    notes: list[str] = []
    factorized = 0
    layers = prunable(compact)
    for name, layer in layers:
        if name == layers[-1][0]:  # its rank is capped by the number of outputs already
            notes.append(f"{name}: kept (the output layer).")
            continue
        if getattr(layer, "groups", 1) != 1:
            notes.append(f"{name}: kept (grouped convolution).")
            continue
        W = _matrix(layer)
        out, n_in = W.shape
        if min(out, n_in) <= 2:
            notes.append(f"{name}: kept (too small to factorize, {out}x{n_in}).")
            continue
        S = torch.linalg.svdvals(W)
        r = choose_rank(S, rank_fraction=step["rank_fraction"], energy=step["energy"])
        if r * (n_in + out) >= n_in * out:
            notes.append(f"{name}: kept (rank {r} of {len(S)} would not save parameters).")
            continue
        norm = float(W.norm())
        best = math.sqrt(float((S[r:] ** 2).sum())) / norm if norm > 0 else 0.0
        if step["method"] == "svd":
            new, error = svd_factor(layer, r), best
        else:
            F, G = semi_nmf(W, r, seed=ctx.seed)
            new = _replacement(layer, F, G.T)
            error = float((W - F @ G.T).norm()) / norm if norm > 0 else 0.0
        _set(compact, name, new)
        factorized += 1
        notes.append(f"{name}: rank {r} of {len(S)}, {n_in * out:,} -> {r * (n_in + out):,} "
                     f"weights, relative error {error:.3f}"
                     + (f" (SVD at this rank: {best:.3f})." if step["method"] == "nmf" else "."))
    if not factorized:
        notes.append("No layer was factorized, so the model was not fine-tuned; lower "
                     "rank_fraction (or energy) until a rank saves parameters.")
        return StepResult(model=compact, notes=notes)
    notes += correct_step(compact, model, step, ctx, scale_weights=True,
                          when="before fine-tuning")
    history = ctx.finetune(compact, step["finetune_epochs"], variant="lowrank")
    return StepResult(model=compact, history=history or None, notes=notes)
