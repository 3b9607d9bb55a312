"""Pruning: zero the least important weights, or remove whole neurons and filters.

Unstructured methods score every weight of the Linear and Conv layers and zero the lowest
`amount` fraction, per layer or under one global threshold: by magnitude (Han et al. 2015),
at random (the control any pruning criterion should beat), or by Optimal Brain Damage
saliency 0.5·h_ii·w_i² (LeCun et al. 1990) with a diagonal curvature h from the empirical
Fisher or a Hutchinson estimate of the Hessian, or layer by layer as Optimal Brain Surgeon
(`obs`, Hassibi & Stork 1993, with SparseGPT's solver: `engine.compress.reconstruct`), which
also updates the weights each layer keeps; `reconstruct: obs` gives any other mask that
update. Fine-tuning re-applies the masks after every
optimizer step, so the result is a plain dense model with exact zeros.
`structured` removes the hidden neurons and filters whose incoming weights have the smallest
norm (Li et al. 2017), building physically smaller layers (`engine.compress.channels`: the
built-in chains directly, any other architecture through Torch-Pruning). `gradual` prunes
in steps along Zhu & Gupta's (2017) cubic curve, fine-tuning between steps.
Nothing here mutates the model it is given: every entry point copies first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from engine.compress.base import COMPRESSORS, CompressContext, StepResult, clone, prunable
from engine.compress.capabilities import flat_graph
from engine.compress.channels import structured
from engine.compress.correct import CORRECT, correct_step
from engine.compress.curvature import curvature
from engine.compress.reconstruct import RECONSTRUCT_ROWS, reconstruct
from engine.errors import UserError
from engine.registry import Param

OBD_ROUNDS = 8  # OBD re-estimates the curvature this many times on its way to the amount
DEFAULT_SCOPE = "lamp"  # structured pruning ignores the scope, and says so if one was chosen


def magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean mask of the weights kept when the `amount` fraction smallest in |w| go."""
    return _keep_top(weight.detach().abs(), amount)


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the weights pruning acts on (biases excluded)."""
    weights = [p for _, p in _weights(model)]
    total = sum(p.numel() for p in weights)
    return sum(int((p == 0).sum()) for p in weights) / total if total else 0.0


def cubic_schedule(final: float, steps: int) -> list[float]:
    """Sparsity after each of `steps` steps: s_t = s_f (1 - (1 - t/n)^3) (Zhu & Gupta), which
    prunes fast while many redundant weights remain and slowly near the end."""
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def _keep_top(scores: torch.Tensor, amount: float) -> torch.Tensor:
    # a count, not a threshold: ties (zeros, equal saliencies) cannot shift the sparsity
    k = round(amount * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def _weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every Linear and Conv layer. A torch.export graph hides its layer
    types, so there every parameter with 2+ dimensions named `weight` stands in for them."""
    layers = prunable(model)
    if layers:
        return [(f"{name}.weight".lstrip("."), layer.weight) for name, layer in layers]
    return [(name, p) for name, p in model.named_parameters()
            if p.ndim >= 2 and name.rsplit(".", 1)[-1] == "weight"]


def spared(model: nn.Module, spare: str) -> list[str]:
    """The weight names `spare: "auto"` keeps whole on a convolutional network: its
    depthwise convolutions (a few weights per channel, each channel's only filter) and its
    first and last weight layers (the stem sees raw pixels, the classifier every class).
    An MLP, and `spare: "none"`, spare nothing: Han et al. prune every layer of LeNet."""
    layers = prunable(model)
    if spare == "none" or not any(isinstance(m, nn.Conv1d | nn.Conv2d) for _, m in layers):
        return []
    keep = {layers[0][0], layers[-1][0]}
    keep |= {name for name, m in layers if isinstance(m, nn.Conv1d | nn.Conv2d)
             and m.groups > 1 and m.in_channels == m.groups}
    return [f"{name}.weight".lstrip(".") for name, _ in layers if name in keep]


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """Layer-adaptive magnitude scores (Lee et al. 2021): each weight's squared score over
    the sum of the squared scores in its layer that are as large or larger. The layer's
    largest weight scores 1, and multiplying a layer by a constant changes nothing, so one
    threshold across layers neither follows the layers' arbitrary scales (a BatchNorm after
    a convolution undoes any) nor empties a layer. Already pruned weights (-inf) stay last."""
    flat = scores.flatten()
    dead = torch.isneginf(flat)
    energy = flat.masked_fill(dead, 0.0).double() ** 2
    order = torch.argsort(energy)  # ascending: a weight's suffix sum holds the larger ones
    ranked = energy[order]
    suffix = ranked.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(energy)
    out[order] = ranked / suffix.clamp(min=torch.finfo(torch.float64).tiny)
    return out.masked_fill(dead, -math.inf).view_as(scores)


def _masks(scores: list[torch.Tensor], amount: float, scope: str) -> list[torch.Tensor]:
    if scope == "layer":
        return [_keep_top(s, amount) for s in scores]
    if scope == "lamp":
        scores = [lamp_scores(s) for s in scores]
    keep = _keep_top(torch.cat([s.flatten() for s in scores]), amount)
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores,
                                         strict=True)]


def _obd_masks(model: nn.Module, named: list[tuple[str, nn.Parameter]], step: dict,
               ctx: CompressContext, masks: list[torch.Tensor], amount: float
               ) -> list[torch.Tensor]:
    """OBD's masks at `amount`, reached in OBD_ROUNDS rounds along the cubic schedule, the
    curvature re-estimated on the pruned model each round (LeCun et al. prune, recompute
    the saliencies, and iterate): 0.5·h·w² is a second-order estimate of removing one
    weight, good for small removals, not for 90% at once (README, "OBD" has the figures)."""
    params = [p for _, p in named]
    start = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    for target in cubic_schedule(amount, OBD_ROUNDS):
        h = curvature(model, named, step["curvature"], ctx)
        scores = [(0.5 * hi * p.detach() ** 2).masked_fill(~m, -math.inf)
                  for hi, p, m in zip(h, params, masks, strict=True)]
        masks = _masks(scores, max(target, start), step["scope"])
        _masker(params, masks)(model)
    return masks


def _spread(total: int, steps: int) -> list[int]:
    """Fine-tuning epochs per pruning step: `total` spread evenly, remainder at the end
    (recovering at the final sparsity matters most), at least 1 each when total > 0."""
    if total <= 0:
        return [0] * steps
    base, extra = divmod(total, steps)
    return [max(1, base + (t >= steps - extra)) for t in range(steps)]


def _plan_notes(plan: list[tuple[float, int]]) -> list[str]:
    epochs = sum(e for _, e in plan)
    notes = [f"Fine-tuned for {epochs} epoch{'s' * (epochs != 1)} after pruning." if epochs
             else "Not fine-tuned (finetune_epochs is 0)."]
    if len(plan) > 1:
        notes.insert(0, f"Pruned gradually in {len(plan)} steps along the cubic schedule: "
                        f"{', '.join(f'{s:.1%}' for s, _ in plan)}.")
    return notes


def _merge(histories: list[dict[str, list[float]]]) -> dict[str, list[float]] | None:
    """One history across gradual steps: epochs renumbered 1..N, times made cumulative."""
    parts = [h for h in histories if h]
    if not parts:
        return None
    merged: dict[str, list[float]] = {k: [] for k in parts[0]}
    for h in parts:
        offset = merged["time_s"][-1] if merged.get("time_s") else 0.0
        for key, values in h.items():
            merged[key] += [v + offset for v in values] if key == "time_s" else values
    merged["epoch"] = list(range(1, len(merged["epoch"]) + 1))
    return merged


def _unstructured(model: nn.Module, step: dict, ctx: CompressContext,
                  plan: list[tuple[float, int]], reference: nn.Module) -> StepResult:
    named = _weights(model)
    if not named:
        raise UserError("this model has no weight matrices or convolution kernels to prune; "
                        "pick another model or technique.")
    if step["method"] == "obs" and not prunable(model):
        raise UserError(flat_graph("obs pruning", "magnitude or obd pruning"))
    kept_whole = spared(model, step["spare"])
    named = [(n, p) for n, p in named if n not in kept_whole] or named
    params = [p for _, p in named]
    method = step["method"]
    rebuilds = method == "obs" or step["reconstruct"] == "obs"  # the OBS refit runs
    gen = torch.Generator().manual_seed(ctx.seed)
    # random scores are drawn once, so that successive gradual masks are nested
    fixed = [torch.rand(p.shape, generator=gen).to(p.device) for p in params
             ] if method == "random" else []
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    histories = []
    for amount, epochs in plan:
        if method == "obd":  # its saliency is re-estimated on the way
            masks = _obd_masks(model, named, step, ctx, masks, amount)
        else:
            # obs: magnitude says how many each block of columns loses, OBS chooses which
            scores = fixed if method == "random" else [p.detach().abs() for p in params]
            # a weight pruned at an earlier step stays pruned
            scores = [s.masked_fill(~m, -math.inf) for s, m in zip(scores, masks, strict=True)]
            masks = _masks(scores, amount, step["scope"])
        if rebuilds:  # before the masks zero the weights: it needs them
            rebuilt = _reconstruct(model, named, masks, ctx, choose=method == "obs")
        reapply = _masker(params, masks)
        reapply(model)
        corrected = correct_step(model, reference, step, ctx, scale_weights=True,
                                 when="before fine-tuning")
        histories.append(ctx.finetune(model, epochs, variant="prune", after_step=reapply))

    how = {"magnitude": "by magnitude", "random": "at random",
           "obs": "by Optimal Brain Surgeon saliency (SparseGPT's layer-wise solver)",
           "obd": f"by Optimal Brain Damage saliency ({step['curvature']} curvature)"}[method]
    where = {"layer": "in each layer", "global": "under one global threshold",
             "lamp": "under one global threshold on layer-adaptive (LAMP) scores"
             }[step["scope"]]
    per_layer = ", ".join(f"{n.removesuffix('.weight')} {float((p == 0).float().mean()):.1%}"
                          for n, p in named)
    notes = [f"Pruned {step['amount']:.0%} of the weights {how} {where}; sparsity: "
             f"{per_layer} (overall {sparsity(model):.1%})."]
    if kept_whole:
        notes.append(f"Kept whole as sensitive (spare: auto; \"none\" prunes them too): the "
                     f"first and last layers and the depthwise convolutions: "
                     f"{_abridged([n.removesuffix('.weight') for n in kept_whole], 2, 6)}.")
    if rebuilds:
        notes.append(rebuilt)  # the last step's
    notes += corrected  # the last step's
    pruned = {id(p) for p in params}
    kept = [n for n, p in model.named_parameters()
            if id(p) not in pruned and n not in kept_whole]
    if kept:
        notes.append(f"Not pruned: {_abridged(kept, 4, 8)} (biases, and layers other than Linear "
                     f"and Conv, are kept whole).")
    if not prunable(model):
        notes.append("This model's layer types are hidden (a torch.export graph), so every "
                     "parameter named weight with 2 or more dimensions was pruned.")
    return StepResult(model=model, history=_merge(histories), notes=notes + _plan_notes(plan))


def _reconstruct(model: nn.Module, named: list[tuple[str, nn.Parameter]],
                 masks: list[torch.Tensor], ctx: CompressContext, *, choose: bool) -> str:
    """`reconstruct: obs` (or method obs, which `choose`s the masks too) on the layers
    being pruned; the sentence the run shows."""
    by_weight = {id(layer.weight): layer for _, layer in prunable(model)}
    layers = [by_weight.get(id(p)) for _, p in named]
    if any(layer is None for layer in layers):
        return ("Not reconstructed: this model's layer types are hidden (a torch.export "
                "graph), so their inputs cannot be read; the masks alone were applied.")
    X = ctx.tensors["X_train"]
    done = reconstruct(model, layers, masks, X, choose=choose)
    chose = ("chose which weights to zero by Optimal Brain Surgeon saliency and " if choose
             else "")
    return (f"Layer by layer, {chose}reconstructed {done} of {len(layers)} pruned layers "
            f"(Optimal Brain Surgeon "
            f"updates of the weights they keep) to reproduce their outputs on "
            f"{min(len(X), RECONSTRUCT_ROWS)} training rows, before fine-tuning.")


def _abridged(names: list[str], head: int, most: int) -> str:
    """`names` joined, or its first `head`, a count of the rest and the last when there are
    more than `most` (EfficientNet has 97 BatchNorm parameters)."""
    if len(names) > most:
        names = [*names[:head], f"{len(names) - head - 1} more", names[-1]]
    return ", ".join(names)


def _masker(params: list[nn.Parameter], masks: list[torch.Tensor]
            ) -> Callable[[nn.Module], None]:
    dead = [~m for m in masks]

    @torch.no_grad()
    def reapply(_model: nn.Module) -> None:  # masked_fill, not a product: +0.0, never -0.0
        for p, d in zip(params, dead, strict=True):
            p.masked_fill_(d, 0.0)
    return reapply


UNSTRUCTURED = ("method", ("magnitude", "random", "obd", "obs"))  # where scope and spare apply


@COMPRESSORS.register(
    "prune", "Pruning: zero the least important weights (by magnitude, at random, by "
    "Optimal Brain Damage saliency or layer by layer as Optimal Brain Surgeon) or remove "
    "whole neurons and filters, then fine-tune.",
    params=(
        Param("method", "str", "magnitude", "magnitude: smallest |w| go; random: a control; "
              "structured: remove whole neurons/filters (smaller, faster layers); obd: "
              "smallest curvature-weighted saliency 0.5·h·w² go; obs: Optimal Brain "
              "Surgeon, layer by layer: the weights whose removal its inputs' covariance "
              "says costs least go, and the kept ones are updated to make up for them",
              choices=("magnitude", "random", "structured", "obd", "obs")),
        Param("amount", "float", 0.8, "fraction of weights removed (structured: of each hidden "
              "layer's neurons or filters)", low=0.0, high=0.99),
        Param("scope", "str", DEFAULT_SCOPE, "layer: each layer loses `amount`; global: one "
              "threshold across layers, so layers with small weights lose more (on a "
              "network with BatchNorm the layers' weight scales are arbitrary, and global "
              "magnitude pruning can empty one); lamp: one threshold on layer-adaptive "
              "scores (Lee et al. 2021), each weight against the larger ones of its own "
              "layer, so a layer's scale does not decide and none is emptied (not for "
              "structured)",
              choices=("layer", "global", "lamp"), when=UNSTRUCTURED),
        Param("spare", "str", "auto", "auto: on a convolutional network, keep depthwise "
              "convolutions and the first and last layers whole (the sensitive ones); none: "
              "prune every Linear and Conv layer (not for structured)",
              choices=("auto", "none"), when=UNSTRUCTURED),
        Param("norm", "str", "l1", "structured: norm that ranks neurons and filters",
              choices=("l1", "l2"), when=("method", ("structured",))),
        Param("curvature", "str", "hessian", "obd: hessian (Hutchinson estimate of its "
              "diagonal) or fisher (the true Fisher: squared gradients at labels drawn from "
              "the model)", choices=("hessian", "fisher"), when=("method", ("obd",))),
        Param("reconstruct", "str", "none", "obs: after the mask is chosen, update each "
              "layer's kept weights (Optimal Brain Surgeon, solved as SparseGPT does) so its "
              "outputs on training rows stay as before: recovers much of what pruning cost "
              "before any fine-tuning, no labels needed (not for structured); none: only "
              "zero the weights", choices=("none", "obs"),
              when=("method", ("magnitude", "random", "obd"))),
        Param("schedule", "str", "oneshot", "oneshot: prune once then fine-tune; gradual: "
              "prune in steps along a cubic curve, fine-tuning between steps",
              choices=("oneshot", "gradual")),
        Param("steps", "int", 4, "gradual: number of pruning steps", low=1, high=50,
              when=("schedule", ("gradual",))),
        CORRECT,
        Param("finetune_epochs", "int", 5, "epochs of fine-tuning in all (gradual: spread over "
              "the steps, at least 1 each)", low=0, high=1000),
    ))
def prune(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Prune a copy of `model` as `step` says and fine-tune it; `model` is not mutated."""
    n = step["steps"] if step["schedule"] == "gradual" else 1
    plan = list(zip(cubic_schedule(step["amount"], n), _spread(step["finetune_epochs"], n),
                    strict=True))
    if step["method"] == "structured":  # copies first, like every method
        pruned, histories, notes = structured(model, step, ctx, plan)
        if step["scope"] != DEFAULT_SCOPE:
            notes.append("The scope setting applies to unstructured methods only; structured "
                         "pruning removes the same fraction from every hidden layer.")
        if step["reconstruct"] != "none":
            notes.append("The reconstruct setting applies to unstructured methods only; "
                         "structured pruning removes whole channels, leaving no kept "
                         "weights of theirs to update.")
        return StepResult(model=pruned, history=_merge(histories),
                          notes=notes + _plan_notes(plan))
    return _unstructured(clone(model), step, ctx, plan, model)
