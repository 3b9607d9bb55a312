"""Quantization: fewer bits per weight (and per activation), one technique, six methods.

- `dynamic_int8`, `static_int8`: the model exported to ONNX and quantized by ONNX Runtime
  (int8 weights; activations quantized on the fly, or with ranges calibrated on training
  rows). The variant runs in ONNX Runtime only, so it is evaluated here and ends a chain.
- `fp16`: weights rounded to float16 values (kept as float32 tensors so CPU inference runs).
- `uniform`, `log`: k-bit weights on an affine grid or on powers of two, per output channel
  or per tensor, optionally fine-tuned with a straight-through estimator.
- `qat`: quantization-aware training (Jacob et al., 2018): fake-quantized weights and 8-bit
  activations during fine-tuning, then baked into a plain model.

Exact zeros stay exact zeros in every method, so pruning survives a later quantize step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
from engine.compress.capabilities import FP16_CPU, flat_graph
from engine.compress.correct import CORRECT, correct_step
from engine.compress.onnx_int8 import calibration_batch, onnx_int8
from engine.errors import UserError
from engine.models import set_training
from engine.quantizers import (
    ACTIVATION_BITS,
    FAKE_QUANT,
    QUANT_INPUT,
    ActivationFakeQuant,
    fp16_round,
    quantize_tensor,
)
from engine.registry import Param

METHODS = ("dynamic_int8", "static_int8", "fp16", "uniform", "log", "qat")
ONNX_METHODS = ("dynamic_int8", "static_int8")  # yield ONNX Runtime models: last in a chain
K_BIT = ("method", ("uniform", "log", "qat"))  # where bits, fine-tuning and correction apply


# --- the technique -------------------------------------------------------------------------

@COMPRESSORS.register(
    "quantize", "Quantization: int8 ONNX Runtime models (dynamic, or static with calibrated "
    "activations), float16 weights, k-bit uniform or power-of-two weights, or "
    "quantization-aware training.", params=(
        Param("method", "str", "static_int8", "dynamic_int8/static_int8: ONNX Runtime int8 "
              "model; fp16: float16 weights; uniform: k-bit affine grid; log: powers of two; "
              "qat: quantization-aware training", choices=METHODS),
        Param("bits", "int", 8, "bits per weight (uniform, log, qat)", low=2, high=8,
              when=K_BIT),
        Param("layer_bits", "dict", {}, "mixed precision: {layer name: bits} for the layers "
              "that take another width than `bits`", when=K_BIT),
        Param("per_channel", "bool", True, "one scale per output channel, else one per "
              "tensor", when=("method", tuple(m for m in METHODS if m != "fp16"))),
        Param("calibration_rows", "int", 512, "training rows used to calibrate activation "
              "ranges (static_int8, qat)", low=16, high=100000,
              when=("method", ("static_int8", "qat"))),
        Param("finetune_epochs", "int", 3, "fine-tuning epochs with a straight-through "
              "estimator (qat; uniform/log: 0 quantizes without fine-tuning)",
              low=0, high=1000, when=K_BIT),
        dataclasses.replace(CORRECT, help="uniform, log, qat: after quantizing, " + CORRECT.help
                            + " (weights stay on their grid: biases and BatchNorms carry it)",
                            when=K_BIT),
    ), terminal_methods=ONNX_METHODS)
def quantize(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Quantize a copy of `model` as `step["method"]` says; `model` is unchanged."""
    method = step["method"]
    if method in ONNX_METHODS:
        return onnx_int8(model, step, ctx)
    if method == "fp16":
        return _fp16(model, ctx)
    return _weights(model, step, ctx, activations=method == "qat")


def _fp16(model: nn.Module, ctx: CompressContext) -> StepResult:
    out = clone(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.copy_(fp16_round(p))
    notes = ["Weights and biases rounded to float16 values; they stay float32 tensors so CPU "
             "inference runs, and the shipped file stores them in 16 bits."]
    if not torch.cuda.is_available():  # said as the Data & Model page's table says it
        notes.insert(0, FP16_CPU)
    return StepResult(model=out, notes=notes)


def _weights(model: nn.Module, step: dict, ctx: CompressContext, *,
             activations: bool) -> StepResult:
    """uniform, log (optionally fine-tuned) and qat (fine-tuned, activations too)."""
    per_channel = step["per_channel"]
    scheme = "log" if step["method"] == "log" else "uniform"
    epochs = step["finetune_epochs"]
    out = clone(model)
    layers = prunable(out)
    if not layers:
        raise UserError(flat_graph(f"quantize {step['method']}"))
    widths = layer_widths(out, step, low=2)
    history, later = None, []  # later: what the quantizer insertion had to say
    if epochs > 0 or activations:
        history = _quantization_aware(out, layers, step, ctx, scheme=scheme,
                                      activations=activations, notes=later)
    with torch.no_grad():
        for name, layer in layers:
            layer.weight.copy_(quantize_tensor(layer.weight, widths[name], scheme, per_channel))
    later += correct_step(out, model, step, ctx, scale_weights=False, when="after quantizing")
    grid = "powers of two" if scheme == "log" else "an affine grid"
    notes = [f"Weights of {widths_text(widths)} on {grid}, one grid per "
             f"{'output channel' if per_channel else 'tensor'}; biases stay float32; "
             f"zeros stay zeros."]
    if activations:
        notes.append(f"Inputs of every Linear/Conv layer fake-quantized to {ACTIVATION_BITS} "
                     f"bits with scales frozen after {epochs} fine-tuning epochs "
                     f"(straight-through estimator).")
    elif epochs > 0:
        notes.append(f"Fine-tuned {epochs} epochs with a straight-through estimator.")
    return StepResult(model=out, history=history or None, notes=notes + later)


def _quantization_aware(model: nn.Module, layers: list[tuple[str, nn.Module]], step: dict,
                        ctx: CompressContext, *, scheme: str, activations: bool,
                        notes: list[str]) -> dict[str, list[float]]:
    """Fine-tune `model` in place with fake-quantized weights (and activations when asked);
    afterwards the layers are plain again and the activation quantizers frozen."""
    quantizers = _insert_activation_quantizers(model, layers, notes) if activations else []
    originals = {}
    for name, layer in layers:
        originals[name] = type(layer)
        layer.__class__ = next(fq for base, fq in FAKE_QUANT.items()
                               if isinstance(layer, base))
        layer.qat_bits = step.get("layer_bits", {}).get(name, step["bits"])
        layer.qat_scheme = scheme
        layer.qat_per_channel = step["per_channel"]
    if quantizers:  # initial ranges from training rows, so 0 epochs still gives sane scales
        set_training(model, False)
        for q in quantizers:
            q.train()
        X = ctx.tensors["X_train"][:step["calibration_rows"]]
        batch = calibration_batch(X.shape[1:])
        with torch.no_grad():
            for i in range(0, len(X), batch):
                model(X[i:i + batch])
    masks = _zero_masks(layers)
    try:
        history = ctx.finetune(model, step["finetune_epochs"], variant="quantize",
                               after_step=_reapply(masks) if masks else None)
    finally:
        for name, layer in layers:
            layer.__class__ = originals[name]
            del layer.qat_bits, layer.qat_scheme, layer.qat_per_channel
        for q in quantizers:
            q.frozen = True
        set_training(model, False)
    return history


def _insert_activation_quantizers(model: nn.Module, layers: list[tuple[str, nn.Module]],
                                  notes: list[str]) -> list[nn.Module]:
    """An ActivationFakeQuant named `<layer>_input_quant` before each layer in its parent
    nn.Sequential, or, where the parent is another module, the layer's own child
    `input_quant` (a QuantInput layer); the layers keep their names (`fc1.weight` stays
    `fc1.weight`)."""
    quantizers, skipped = [], []
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        own = type(parent) is not nn.Sequential  # the layer quantizes its own input
        if own and type(layer) not in QUANT_INPUT:  # a library's own Conv subclass
            skipped.append(name)
            continue
        quantizer = ActivationFakeQuant().to(next(model.parameters()).device)
        quantizers.append(quantizer)
        if own:
            layer.__class__ = QUANT_INPUT[type(layer)]
            layer.input_quant = quantizer
            continue
        entries = list(parent._modules.items())
        parent._modules.clear()
        for key, module in entries:
            if key == child:
                parent._modules[f"{child}_input_quant"] = quantizer
            parent._modules[key] = module
    if skipped:
        notes.append(f"The inputs of {len(skipped)} layer(s) stay float32 ({skipped[0]}"
                     f"{' and others' if len(skipped) > 1 else ''}): they are their library's "
                     f"own Conv/Linear subclasses, whose forward an input quantizer cannot "
                     f"join; their weights are quantized all the same.")
    return quantizers


def _zero_masks(layers: list[tuple[str, nn.Module]]) -> dict[nn.Parameter, torch.Tensor]:
    """Where earlier pruning left zeros, to keep them zero while fine-tuning."""
    masks = {}
    for _, layer in layers:
        mask = layer.weight.detach() != 0
        if not bool(mask.all()):
            masks[layer.weight] = mask
    return masks


def _reapply(masks: dict[nn.Parameter, torch.Tensor]) -> Callable[[nn.Module], None]:
    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for weight, mask in masks.items():
                weight.mul_(mask)
    return after_step
