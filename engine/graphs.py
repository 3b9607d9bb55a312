"""Exported graphs (`.pt2`, converted TorchScript) as modules whose layers are visible.

`torch.export.unflatten` gives back the module tree of an exported program, but as
`InterpreterModule`s: a Linear is a small graph calling `aten.linear`. `from_program`
turns each leaf that is one linear, convolution or batch-norm call into the real
`nn.Linear`, `nn.Conv1d/2d` or `nn.BatchNorm1d/2d` with the same weights, so pruning,
low-rank, sharing, k-bit and QAT see and replace them like any layer, and BatchNorm trains
again. The parent graphs call their children by name, so a replaced layer is simply used.
A convolution that pads its input first through a child (TensorFlow's "same" padding, as
EfficientNet ports do) becomes the convolution with that padding when it is symmetric, else
a `Sequential` of `ZeroPad2d` and the convolution (`pad`, `conv`). The model keeps the
program's bytes (`workbench_graph`) for its bundle.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.export.unflatten import InterpreterModule, UnflattenedModule

aten = torch.ops.aten
CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d}
NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}


class GraphModel(UnflattenedModule):
    """An unflattened exported program as a model that takes one batch, so it exports
    again (torch.export, ONNX) like any other; its layers keep the program's names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def from_program(program: Any) -> GraphModel:
    """The program's module tree with real layers, ready to train, copy and compress."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    net = torch.export.unflatten(program)
    for name, sub in reversed(list(net.named_modules())):  # children before their parents
        if not isinstance(sub, InterpreterModule):
            continue
        layer = _real_layer(sub) if not list(sub.children()) else _padded_conv(sub)
        if layer is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, layer)
    for sub in net.modules():  # the symbolic shapes in node.meta cannot be deep-copied
        graph = getattr(sub, "graph", None)
        if graph is not None:
            for node in graph.nodes:
                node.meta = {}
    net.__class__ = GraphModel
    model = net
    model.workbench_graph = buffer.getvalue()
    model.workbench_builder = {"kind": "pt2", "file": "graph.pt2"}
    return model


def load_program(data: bytes) -> GraphModel:
    """A GraphModel from the bytes of a `.pt2` archive."""
    return from_program(torch.export.load(io.BytesIO(data)))


def _padded_conv(sub: nn.Module) -> nn.Module | None:
    """A convolution whose input goes through one child first: a zero padding (as a
    ZeroPad2d, found below) or nothing (an unused Identity-like child)."""
    modules = [n for n in sub.graph.nodes if n.op == "call_module"]
    conv = _real_layer(sub, allow_children=True)
    if not isinstance(conv, nn.Conv2d) or len(modules) > 1:
        return None
    if not modules:  # the child is never called
        return conv
    pad = sub.get_submodule(str(modules[0].target))
    if not isinstance(pad, nn.ZeroPad2d | nn.Identity):
        return None
    if isinstance(pad, nn.Identity) or conv.padding not in ((0, 0), "valid"):
        return conv if isinstance(pad, nn.Identity) else None
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:  # symmetric: the convolution's own padding
        conv.padding = (top, left)
        return conv
    return nn.Sequential(OrderedDict(pad=pad, conv=conv))


def _zero_pad(sub: nn.Module, calls: list[Any]) -> nn.Module | None:
    """A leaf that only pads 2-D inputs with zeros, or passes them on, as a real module."""
    if not calls:
        return nn.Identity()
    if len(calls) != 1 or calls[0].target != aten.pad.default:
        return None
    args = [*calls[0].args, "constant", 0.0][:4]
    amounts, mode, value = args[1], args[2], args[3]
    if len(amounts) != 4 or mode != "constant" or value not in (0, 0.0, None):
        return None
    return nn.ZeroPad2d(tuple(int(a) for a in amounts))


def _real_layer(sub: nn.Module, *, allow_children: bool = False) -> nn.Module | None:
    calls = [n for n in sub.graph.nodes if n.op == "call_function"
             and n.target is not getattr]  # getitem of a batch-norm's outputs
    calls = [n for n in calls if "getitem" not in str(n.target)]
    if not dict(sub.named_parameters(recurse=False)) and not allow_children:
        return _zero_pad(sub, calls)
    if len(calls) != 1:
        return None
    call = calls[0]
    params = dict(sub.named_parameters(recurse=False))
    buffers = dict(sub.named_buffers(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None:
        return None
    if call.target == aten.linear.default:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif call.target in CONVS:
        args = [*call.args, None, None, None, None, None, None, None][:7]
        dims = weight.dim() - 2
        stride, padding, dilation, groups = (args[3] or [1] * dims, args[4] or [0] * dims,
                                             args[5] or [1] * dims, args[6] or 1)
        layer = CONVS[call.target](
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=tuple(stride), dilation=tuple(dilation), groups=groups,
            padding=padding if isinstance(padding, str) else tuple(padding),
            bias=bias is not None)
    elif call.target in NORMS and "running_mean" in buffers:
        eps = call.args[-1] if isinstance(call.args[-1], float) else 1e-5
        norm = nn.BatchNorm2d if weight.dim() == 1 and _is_2d(call) else nn.BatchNorm1d
        layer = norm(weight.shape[0], eps=eps)
    else:
        return None
    state = {**params, **buffers}
    missing, unexpected = layer.load_state_dict(
        {k: v for k, v in state.items() if k in layer.state_dict()}, strict=False)
    if [k for k in missing if k != "num_batches_tracked"] or unexpected:
        return None
    return layer


def _is_2d(call: Any) -> bool:
    """Whether a batch-norm call normalizes images (4-D input); unknown counts as images."""
    value = call.args[0].meta.get("val") if hasattr(call.args[0], "meta") else None
    return value is None or value.dim() == 4
