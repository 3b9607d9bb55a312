"""Structured pruning: whole neurons, filters and channels removed, layers made smaller.

The built-in mlp and cnn are chains of layers, pruned here directly (`structured_prune`:
each hidden layer loses its lowest-norm neurons or filters and the next layer their input
columns, with the constant a removed neuron still emitted folded into the next bias).
Anything else (residual blocks, BatchNorm, depthwise and grouped convolutions, squeeze-excitation:
ResNet, MobileNetV2, EfficientNet, ConvNeXt) goes through `torch_pruning`: its dependency
graph finds every layer coupled to a channel (the BatchNorm after a convolution, the other
branch of a residual addition, the depthwise convolution that must lose the same channel,
the next layer's input), and removes the group together, ranked by the L1 or L2 norm of the
group's weights (Li et al. 2017, as Torch-Pruning's MagnitudeImportance). The output layer
keeps its classes. Transformers lose attention heads and MLP neurons instead
(engine.compress.heads), or are refused in one sentence where their layout is unknown.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from engine.compress.base import CompressContext, clone, prunable
from engine.compress.capabilities import structured_refusal
from engine.compress.correct import correct_step
from engine.compress.heads import attention_module, prune_transformer, pruned_sentences
from engine.errors import UserError

Pruned = tuple[nn.Module, list[dict[str, list[float]]], list[str]]


NEEDS_BUILTIN = ("structured pruning needs a built-in architecture (mlp or cnn); use magnitude "
                 "pruning for this model.")
# layers that keep a neuron's or channel's identity between two prunable layers
_PASSTHROUGH = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU,
                nn.Tanh, nn.GELU, nn.Sigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                nn.AvgPool2d)
_RESHAPING = (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


def channel_prune(model: nn.Module, amount: float, norm: str, ctx: CompressContext,
                  ) -> tuple[nn.Module, list[str]]:
    """A physically smaller copy of `model` with `amount` of the channels of every coupled
    group removed (each group at least one channel keeps), and a sentence per fact."""
    refusal = structured_refusal(model)
    if refusal is not None:
        raise UserError(refusal)
    layers = prunable(model)
    out = clone(model)
    out.eval()
    named = dict(out.named_modules())
    output_layer = named[layers[-1][0]]
    example = torch.zeros((2, *ctx.input_shape), device=next(out.parameters()).device)
    before = sum(p.numel() for p in out.parameters())
    try:
        pruner = tp.pruner.BasePruner(
            out, example, importance=tp.importance.MagnitudeImportance(p=1 if norm == "l1"
                                                                      else 2),
            pruning_ratio=amount, ignored_layers=[output_layer])
        pruner.step()
        with torch.no_grad():
            out(example)
    except UserError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"Torch-Pruning could not trace this model's channel dependencies "
                        f"({type(exc).__name__}: {reason}); use magnitude pruning.") from None
    after = sum(p.numel() for p in out.parameters())
    widths = [f"{name} {layer.weight.shape[0]} → {named[name].weight.shape[0]}"
              for name, layer in prunable(model)[:4]
              if named[name].weight.shape[0] != layer.weight.shape[0]]
    notes = [f"Removed {amount:.0%} of the channels of every coupled group through "
             f"Torch-Pruning's dependency graph (BatchNorms, residual additions and depthwise "
             f"convolutions lose the same channels), ranked by {norm.upper()} norm; "
             f"the output layer {layers[-1][0]} keeps its {output_layer.weight.shape[0]} "
             f"outputs. First widths: {', '.join(widths) or 'unchanged'}.",
             f"Parameters: {before:,} → {after:,} ({1 - after / before:.1%} fewer)."]
    return out, notes


def _chain(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """(name, layer, the pass-through modules after it) for each Linear/Conv of a built-in."""
    if not isinstance(model, nn.Sequential):
        raise UserError(NEEDS_BUILTIN)
    chain: list[tuple[str, nn.Module, list[nn.Module]]] = []
    for name, m in model.named_children():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(m, "groups", 1) == 1:
            chain.append((name, m, []))
        elif isinstance(m, _PASSTHROUGH):
            if chain:
                chain[-1][2].append(m)
        else:
            raise UserError(f"{NEEDS_BUILTIN[:-1]} (layer {name!r} is a {type(m).__name__}).")
    return chain


def _resized(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    kw = {"bias": b is not None, "device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], **kw)
    else:
        new = type(layer)(w.shape[1], w.shape[0], layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation,
                          padding_mode=layer.padding_mode, **kw)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new.train(layer.training)


def structured_prune(model: nn.Module, amount: float, norm: str = "l1", *,
                     widths: dict[str, int] | None = None
                     ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A smaller copy of a built-in mlp or cnn (the input is not mutated): each hidden layer
    loses round(amount·width) neurons or filters (at least 1 stays), those whose incoming
    weights have the smallest L1/L2 norm, and the next layer loses their input columns.
    `widths` (original widths) makes `amount` a fraction of those, for gradual steps.
    Returns the copy and, per hidden layer, the indices of the outputs kept."""
    _chain(model)  # refuse before copying
    model = clone(model)
    chain = _chain(model)
    kept: dict[str, torch.Tensor] = {}
    cols: torch.Tensor | None = None  # this layer's inputs that survived upstream removal
    for i, (name, layer, between) in enumerate(chain):
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        w = w if cols is None else w[:, cols]
        keep = torch.arange(w.shape[0], device=w.device)
        if i + 1 < len(chain):  # ranked on the inputs that remain (Li et al.'s greedy variant)
            n0 = (widths or {}).get(name, w.shape[0])
            n_keep = min(w.shape[0], max(1, n0 - round(amount * n0)))
            score = w.flatten(1).norm(p=1 if norm == "l1" else 2, dim=1)
            keep = kept[name] = torch.topk(score, n_keep).indices.sort().values
            nxt = chain[i + 1][1]
            # a conv feeding a Linear through Flatten: channel c owns columns [c*S, (c+1)*S)
            span = nxt.weight.shape[1] // w.shape[0] if isinstance(nxt, nn.Linear) else 1
            cols = (keep[:, None] * span + torch.arange(span, device=w.device)).flatten()
            _fold_constant(nxt, between, cols)
        setattr(model, name, _resized(layer, w[keep], None if b is None else b[keep]))
    return model, kept


@torch.no_grad()
def _fold_constant(nxt: nn.Module, between: list[nn.Module], cols: torch.Tensor) -> None:
    """A masked neuron still emits act(0) (0.5 for a sigmoid); move what that adds to the
    next layer into its bias, so removal equals masking (exactly for a Linear next; for a
    Conv next, except where its padding meets the border)."""
    a = torch.zeros(1, device=nxt.weight.device)
    for m in between:
        if not isinstance(m, _RESHAPING):
            a = m(a)
    if float(a) == 0 or nxt.bias is None:
        return
    gone = torch.ones(nxt.weight.shape[1], dtype=torch.bool, device=cols.device)
    gone[cols] = False
    nxt.bias += float(a) * nxt.weight[:, gone].flatten(1).sum(1)


_WHEN = ("before fine-tuning (a narrowed layer is corrected where its BatchNorm shows which "
         "channels it kept)")


def _any_structured(model: nn.Module, step: dict, ctx: CompressContext,
                    plan: list[tuple[float, int]]) -> Pruned:
    """Any architecture: Torch-Pruning's groups, step by step (each step's ratio is of the
    channels left, so the steps reach the planned fractions of the original widths)."""
    histories, notes, done, reference = [], [], 0.0, model
    for amount, epochs in plan:
        model, notes = channel_prune(model, 1 - (1 - amount) / (1 - done), step["norm"], ctx)
        done = amount
        corrected = correct_step(model, reference, step, ctx, scale_weights=True,
                                 when=_WHEN)
        histories.append(ctx.finetune(model, epochs, variant="prune"))
    return model, histories, notes + corrected


def _transformer(model: nn.Module, step: dict, ctx: CompressContext,
                 plan: list[tuple[float, int]]) -> Pruned:
    """Heads and MLP neurons (engine.compress.heads), step by step as `_any_structured`."""
    refusal = structured_refusal(model)
    if refusal is not None:
        raise UserError(refusal)
    histories, counts, done = [], [], 0.0
    model = clone(model)
    example = torch.zeros((2, *ctx.input_shape), device=next(model.parameters()).device)
    for amount, epochs in plan:
        counts.append(prune_transformer(model, 1 - (1 - amount) / (1 - done), step["norm"]))
        try:  # a layer that keeps its head count elsewhere (a bias per head) shows here
            with torch.no_grad():
                model.eval()(example)
        except Exception as exc:
            raise UserError(f"after removing heads and neurons this model's forward pass "
                            f"failed ({type(exc).__name__}), so its layers keep their head "
                            f"count somewhere else; use magnitude pruning, low-rank or "
                            f"quantization for it.") from None
        done = amount
        histories.append(ctx.finetune(model, epochs, variant="prune"))
    return model, histories, pruned_sentences(counts[0], counts[-1], done, step["norm"])


def structured(model: nn.Module, step: dict, ctx: CompressContext,
               plan: list[tuple[float, int]]) -> Pruned:
    """Structured pruning along `plan` ((amount, fine-tuning epochs) per step): the
    pruned model, each step's fine-tuning history, and what was removed in sentences."""
    if attention_module(model) is not None:
        return _transformer(model, step, ctx, plan)
    try:
        chain = _chain(model)
    except UserError:  # not a built-in chain: residuals, BatchNorm, ... go to Torch-Pruning
        return _any_structured(model, step, ctx, plan)
    if len(chain) < 2:
        return clone(model), [], [
            "This model has no hidden layer (logistic regression), so structured pruning had "
            "nothing to remove; the model is unchanged."]
    widths = {name: layer.weight.shape[0] for name, layer, _ in chain[:-1]}
    before = sum(p.numel() for p in model.parameters())
    histories, reference, corrected = [], model, []
    for amount, epochs in plan:
        model, _ = structured_prune(model, amount, step["norm"], widths=widths)
        corrected = correct_step(model, reference, step, ctx, scale_weights=True, when=_WHEN)
        histories.append(ctx.finetune(model, epochs, variant="prune"))
    after = sum(p.numel() for p in model.parameters())
    sizes = ", ".join(f"{n} {w} → {model.get_submodule(n).weight.shape[0]}"
                      for n, w in widths.items())
    notes = [f"Removed {step['amount']:.0%} of each hidden layer's neurons or filters (lowest "
             f"{step['norm'].upper()} norm of incoming weights): {sizes}; the output layer "
             f"{chain[-1][0]} keeps all {chain[-1][1].weight.shape[0]} outputs.",
             f"Parameters: {before:,} → {after:,} ({1 - after / before:.1%} fewer).",
             *corrected]
    return model, histories, notes
