"""Structured pruning of transformers: whole attention heads and MLP neurons removed.

Each layer of a BERT-style encoder (BERT, RoBERTa, MiniLM, DistilBERT, ViT: the query,
key and value projections, an output projection, an MLP of two Linear layers) loses the
same share of its heads and of its MLP's hidden neurons (Michel et al. 2019 remove heads;
the MLP's neurons go as in any MLP). A head is ranked by the norm of its rows of the query,
key and value weights and its columns of the output projection; a neuron by its row of the
first MLP layer and its column of the second. The Linear layers are cut to the kept rows
and columns and the attention module's head count is updated, so the layers are
physically smaller and an ONNX export is too (the attention reshapes by the head size, not
the count). Every layer keeps at least one head and one neuron. A layer laid out otherwise
is refused in one sentence: a head count left stale would be a silent wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import UserError

QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"),
             ("q_proj", "k_proj", "v_proj"))
OUT_NAMES = ("out_lin", "o", "out_proj", "o_proj")  # an output projection inside attention
HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")


@dataclass
class Block:
    """One transformer layer's prunable parts."""

    name: str
    attention: nn.Module
    heads_attr: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def heads(self) -> int:
        return int(getattr(self.attention, self.heads_attr))


def attention_module(model: nn.Module) -> str | None:
    """The name of the first module that splits its width into attention heads, if any."""
    for name, module in model.named_modules():
        if any(hasattr(module, a) for a in HEAD_ATTRS):
            return name
    return None


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and attention_module(m[0]) is not None]


def blocks(model: nn.Module) -> list[Block] | str:
    """The model's transformer layers as Blocks, or the sentence saying why they are not
    laid out as this pruning knows."""
    lists = _layer_lists(model)
    if not lists:
        return (f"structured pruning found no list of transformer layers in this model "
                f"(layer {attention_module(model)} splits its width into heads); use "
                f"magnitude pruning, low-rank or quantization for it.")
    found = []
    list_name, layers = max(lists, key=lambda item: len(item[1]))
    for i, layer in enumerate(layers):
        block = _block(f"{list_name}.{i}", layer)
        if isinstance(block, str):
            return block
        found.append(block)
    return found


def _block(name: str, layer: nn.Module) -> Block | str:
    refusal = (f"structured pruning knows attention layers with query, key and value "
               f"projections, an output projection and a two-layer MLP (BERT, RoBERTa, "
               f"DistilBERT, ViT); layer {name} ({type(layer).__name__}) is laid out "
               f"otherwise; use magnitude pruning, low-rank or quantization for this model.")
    sub = dict(layer.named_modules())
    att_name = attention_module(layer)
    attention = sub[att_name]
    heads_attr = next(a for a in HEAD_ATTRS if hasattr(attention, a))
    qkv = next((names for names in QKV_NAMES
                if all(isinstance(getattr(attention, n, None), nn.Linear) for n in names)),
               None)
    if qkv is None or not isinstance(getattr(attention, heads_attr), int):
        return refusal
    out = next((getattr(attention, n) for n in OUT_NAMES
                if isinstance(getattr(attention, n, None), nn.Linear)), None)
    parent = att_name.rpartition(".")[0]
    if out is None:  # BERT: the projection sits beside the self-attention, in .output.dense
        out = sub.get(f"{parent}.output.dense" if parent else "output.dense")
    if not isinstance(out, nn.Linear):
        return refusal
    taken = {id(getattr(attention, n)) for n in qkv} | {id(out)}
    mlp = [m for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in taken]
    if len(mlp) != 2 or mlp[0].out_features != mlp[1].in_features:
        return refusal
    q, k, v = (getattr(attention, n) for n in qkv)
    if q.out_features % getattr(attention, heads_attr) or out.in_features != v.out_features:
        return refusal
    return Block(name, attention, heads_attr, q, k, v, out, mlp[0], mlp[1])


def _norm(w: torch.Tensor, p: int, dims: tuple[int, ...]) -> torch.Tensor:
    return w.abs().pow(p).sum(dim=dims)


def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[rows].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[rows].clone())
    layer.out_features = len(rows)


def _keep_cols(layer: nn.Linear, cols: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[:, cols].clone())
    layer.in_features = len(cols)


def _kept(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """The indices kept, in order: all but the `amount` share with the lowest scores."""
    keep = max(1, len(scores) - round(amount * len(scores)))
    return scores.topk(keep).indices.sort().values


def prune_transformer(model: nn.Module, amount: float, norm: str) -> dict[str, int]:
    """Remove `amount` of every layer's heads and MLP neurons from `model`, in place; the
    counts before and after (`layers`, `heads`, `heads_kept`, `neurons`, `neurons_kept`,
    `params`, `params_kept`). A layout this does not know is a UserError."""
    found = blocks(model)
    if isinstance(found, str):
        raise UserError(found)
    p = 1 if norm == "l1" else 2
    counts = dict.fromkeys(("heads", "heads_kept", "neurons", "neurons_kept"), 0)
    counts.update(layers=len(found), params=sum(t.numel() for t in model.parameters()))
    with torch.no_grad():
        for b in found:
            size = b.q.out_features // b.heads
            per_head = sum(_norm(m.weight.view(b.heads, size, -1), p, (1, 2))
                           for m in (b.q, b.k, b.v))
            per_head = per_head + _norm(b.out.weight.view(-1, b.heads, size), p, (0, 2))
            heads = _kept(per_head, amount)
            rows = (heads[:, None] * size + torch.arange(size)).flatten()
            for m in (b.q, b.k, b.v):
                _keep_rows(m, rows)
            _keep_cols(b.out, rows)
            counts["heads"] += b.heads
            counts["heads_kept"] += len(heads)
            setattr(b.attention, b.heads_attr, len(heads))
            if hasattr(b.attention, "all_head_size"):
                b.attention.all_head_size = len(rows)
            neurons = _kept(_norm(b.up.weight, p, (1,)) + _norm(b.down.weight, p, (0,)),
                            amount)
            counts["neurons"] += b.up.out_features
            counts["neurons_kept"] += len(neurons)
            _keep_rows(b.up, neurons)
            _keep_cols(b.down, neurons)
    counts["params_kept"] = sum(t.numel() for t in model.parameters())
    return counts


def pruned_sentences(first: dict[str, int], last: dict[str, int], amount: float,
                     norm: str) -> list[str]:
    """What `prune_transformer` did, from its first step's counts to its last's."""
    before, after = first["params"], last["params_kept"]
    return [f"Removed {amount:.0%} of the attention heads and MLP neurons of each of the "
            f"{first['layers']} transformer layers (lowest {norm.upper()} norm of a head's "
            f"query, key, value and output weights, of a neuron's two MLP weights): heads "
            f"{first['heads']} → {last['heads_kept']}, MLP neurons {first['neurons']:,} → "
            f"{last['neurons_kept']:,}; the embeddings and the hidden width stay.",
            f"Parameters: {before:,} → {after:,} ({1 - after / before:.1%} fewer)."]
