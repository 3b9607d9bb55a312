"""What each technique can do with a given model, said before anything runs.

`capabilities(model)` reads the model (its Linear and Conv layers, whether it splits its
width into attention heads, what built it) and returns one row per technique and method:
`works`, `works` with a warning (a technique that runs but cannot pay on this model), or
`refused` with the sentence the technique itself raises. The sentences live here, once,
and the techniques raise them, so the Data & Model page's table and a run agree; a test
runs every technique on every architecture and checks the table against what happened.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.compress.base import prunable
from engine.compress.heads import attention_module, blocks
from engine.models import build_model
from engine.recipe import ModelConfig

FLAT_GRAPH = ("this model's layers are hidden inside one graph (a converted TorchScript "
              "or flat export), so {what} has no Linear or Conv layer to act on; use "
              "{instead}.")
NO_STUDENT = ("distill cannot shrink this teacher by itself (its widths are unknown: an "
              "uploaded graph); set the step's student to a model section, e.g. "
              '{"source": "builtin:mlp", "hidden": [32]}.')
CONV_DYNAMIC = ("dynamic int8 runs this model's convolutions through ConvInteger, which is "
                "usually slower than float32 on a CPU; static_int8 is the better choice for "
                "a convolutional network.")
FP16_CPU = ("fp16 halves the stored weights, but this machine has no GPU and a CPU has no fast "
            "float16 arithmetic: the variant computes in float32 here (no faster), as "
            "arithmetic in float16 on a CPU would be slower still; on a GPU it runs in half "
            "precision.")
ONNX_ONLY = ("an ONNX model runs in ONNX Runtime only: it can be evaluated and int8-quantized "
             "here; upload a .pt2, a bundle or a Hugging Face folder to {what} it.")

# every technique and method the table reports, in menu order
ROWS = (("train", None), ("prune", "magnitude"), ("prune", "random"), ("prune", "obd"),
        ("prune", "obs"), ("prune", "structured"), ("lowrank", "svd"), ("lowrank", "nmf"),
        ("share", None),
        ("quantize", "uniform"), ("quantize", "log"), ("quantize", "qat"),
        ("quantize", "fp16"), ("quantize", "dynamic_int8"), ("quantize", "static_int8"),
        ("distill", None), ("deep_compression", None), ("export", "onnx"))


def flat_graph(what: str, instead: str = "quantize dynamic_int8 or static_int8") -> str:
    return FLAT_GRAPH.format(what=what, instead=instead)


def structured_refusal(model: nn.Module) -> str | None:
    if attention_module(model) is not None:  # heads and MLP neurons, or a sentence why not
        found = blocks(model)
        return found if isinstance(found, str) else None
    if not prunable(model):
        return flat_graph("structured pruning", "magnitude pruning")
    return None


def capabilities(model: nn.Module) -> list[dict[str, Any]]:
    """One row per technique and method: {"technique", "method", "status", "why"}."""
    layers = prunable(model)
    builder = (getattr(model, "workbench_builder", None) or {}).get("kind")
    convs = any(isinstance(m, nn.Conv1d | nn.Conv2d) for _, m in layers)
    weights = any(p.dim() >= 2 for n, p in model.named_parameters() if n.endswith("weight"))
    refusals: dict[tuple[str, str | None], str | None] = {
        ("prune", "structured"): structured_refusal(model),
        ("distill", None): None if builder in ("builtin", "hf", "hf_text") else NO_STUDENT,
    }
    for method in ("magnitude", "random", "obd", "obs"):
        refusals["prune", method] = None if weights else (
            "this model has no weight matrices or convolution kernels to prune; pick "
            "another model or technique.")
    if not layers:
        for technique, method in (("lowrank", "svd"), ("lowrank", "nmf"), ("share", None),
                                  ("quantize", "uniform"), ("quantize", "log"),
                                  ("quantize", "qat"), ("deep_compression", None)):
            name = technique if method is None else f"{technique} {method}"
            refusals[technique, method] = flat_graph(name)
        if weights:  # its layer-wise solver reads each layer's inputs
            refusals["prune", "obs"] = flat_graph("obs pruning", "magnitude or obd pruning")
    rows = []
    for technique, method in ROWS:
        why = refusals.get((technique, method))
        row = {"technique": technique, "method": method,
               "status": "refused" if why else "works", "why": why or ""}
        if (technique, method) == ("quantize", "dynamic_int8") and convs:
            row.update(status="works, slower", why=CONV_DYNAMIC)
        if (technique, method) == ("quantize", "fp16") and not torch.cuda.is_available():
            row.update(status="works, no faster", why=FP16_CPU)
        rows.append(row)
    return rows


def onnx_capabilities() -> list[dict[str, Any]]:
    """The table for an uploaded ONNX model: evaluation and int8 quantization only."""
    rows = []
    for technique, method in ROWS:
        works = (technique, method) in (("quantize", "dynamic_int8"), ("export", "onnx"))
        verb = {"train": "train", "distill": "distill"}.get(technique, "compress")
        rows.append({"technique": technique, "method": method,
                     "status": "works" if works else "refused",
                     "why": "" if works else ONNX_ONLY.format(what=verb)})
    return rows


def model_capabilities(cfg: ModelConfig, input_shape: tuple[int, ...],
                       n_out: int) -> list[dict[str, Any]]:
    """The table for the model a recipe's model section names, on this data."""
    if cfg.source.lower().endswith(".onnx"):
        return onnx_capabilities()
    return capabilities(build_model(cfg, input_shape, n_out, seed=0))
