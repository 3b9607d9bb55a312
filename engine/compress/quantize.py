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

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.compress import COMPRESSORS, CompressContext, StepResult, clone, prunable
from engine.errors import UserError
from engine.registry import Param

METHODS = ("dynamic_int8", "static_int8", "fp16", "uniform", "log", "qat")
ONNX_METHODS = ("dynamic_int8", "static_int8")  # yield ONNX Runtime models: last in a chain
SCHEMES = ("uniform", "log")
ACTIVATION_BITS = 8  # qat: activations as uint8, as ONNX Runtime's int8 kernels take them
EMA_MOMENTUM = 0.01  # qat: weight of each batch in the activation min/max running average
CALIBRATION_BATCH = 256  # rows per calibration batch (static_int8 and qat)
FP16_MAX = 65504.0  # the largest finite float16


# --- the quantizers ------------------------------------------------------------------------

def quantize_tensor(w: torch.Tensor, bits: int, scheme: str = "uniform",
                    per_channel: bool = True) -> torch.Tensor:
    """`w` with every value on a `bits`-bit grid, as a new tensor (`w` is unchanged).

    `uniform`: affine min/max grid, scale * (q - zero_point) with integer q in
    [0, 2^bits - 1]; the range always includes 0 and the zero point is an integer, so
    zeros map back to exactly 0. `log`: sign(w) * 2^e with e the nearest power of two,
    clipped to the 2^(bits-1) - 1 largest exponents in use; zeros stay zero. Either way at
    most 2^bits distinct values per channel (dim 0) or per tensor. Quantization has no
    useful gradient, so the result is detached (a straight-through estimator adds one)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}.")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}.")
    if w.numel() == 0:
        return w.detach().clone()
    x = w.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel and x.ndim >= 1 else x.reshape(1, -1)
    out = _uniform(rows, bits) if scheme == "uniform" else _log(rows, bits)
    return out.reshape(w.shape).to(w.dtype)


def _uniform(rows: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    lo = rows.amin(1, keepdim=True).clamp(max=0.0)  # 0 inside the range: zeros representable
    hi = rows.amax(1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    zero_point = torch.round(-lo / scale).clamp(0, levels)
    q = torch.clamp(torch.round(rows / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def _log(rows: torch.Tensor, bits: int) -> torch.Tensor:
    exponents = 2 ** (bits - 1) - 1  # with the sign and zero: at most 2^bits values
    mag = rows.abs()
    nonzero = mag > 0
    # floor(log2(|w| * 4/3)) is the exponent of the nearest power of two (ties upwards)
    e = torch.floor(torch.log2(torch.where(nonzero, mag, torch.ones_like(mag)) * (4 / 3)))
    e_max = torch.where(nonzero, e, torch.full_like(e, -torch.inf)).amax(1, keepdim=True)
    e_max = torch.where(torch.isfinite(e_max), e_max, torch.zeros_like(e_max))
    e = torch.minimum(torch.maximum(e, e_max - (exponents - 1)), e_max)
    return torch.where(nonzero, torch.sign(rows) * torch.exp2(e), torch.zeros_like(rows))


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest float16 value (saturating at ±65504), in `t`'s dtype."""
    return t.detach().clamp(-FP16_MAX, FP16_MAX).half().to(t.dtype)


class ActivationFakeQuant(nn.Module):
    """8-bit per-tensor affine fake quantization of a layer's input.

    While training (and not frozen) the range is a running average of each batch's min and
    max; frozen, the scale and zero point are constants and the module is three arithmetic
    operations that torch.export and ONNX export as they are. The gradient passes straight
    through (straight-through estimator)."""

    def __init__(self, bits: int = ACTIVATION_BITS, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__()
        self.levels = 2 ** bits - 1
        self.momentum = momentum
        self.frozen = False
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if not bool(self.observed):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.observed.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        low, high = self.min_val.clamp(max=0.0), self.max_val.clamp(min=0.0)
        self.scale.copy_(((high - low) / self.levels).clamp(min=1e-8))
        self.zero_point.copy_(torch.round(-low / self.scale).clamp(0, self.levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            self.observe(x.detach())
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, self.levels)
        y = (q - self.zero_point) * self.scale
        return x + (y - x).detach() if self.training else y

    def extra_repr(self) -> str:
        return (f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, "
                f"frozen={self.frozen}")


class _FakeQuantWeight:
    """Mixin for Linear/Conv: the forward uses the fake-quantized weight; the gradient goes
    straight through to the float weight, which the optimizer keeps updating."""

    qat_bits: int
    qat_scheme: str
    qat_per_channel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        wq = w + (quantize_tensor(w, self.qat_bits, self.qat_scheme,
                                  self.qat_per_channel) - w).detach()
        if isinstance(self, nn.Linear):
            return nn.functional.linear(x, wq, self.bias)
        return self._conv_forward(x, wq, self.bias)


class FakeQuantLinear(_FakeQuantWeight, nn.Linear):
    pass


class FakeQuantConv1d(_FakeQuantWeight, nn.Conv1d):
    pass


class FakeQuantConv2d(_FakeQuantWeight, nn.Conv2d):
    pass


_FAKE_QUANT = {nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d,
               nn.Conv2d: FakeQuantConv2d}


# --- the technique -------------------------------------------------------------------------

@COMPRESSORS.register(
    "quantize", "Quantization: int8 ONNX Runtime models (dynamic, or static with calibrated "
    "activations), float16 weights, k-bit uniform or power-of-two weights, or "
    "quantization-aware training.", params=(
        Param("method", "str", "static_int8", "dynamic_int8/static_int8: ONNX Runtime int8 "
              "model; fp16: float16 weights; uniform: k-bit affine grid; log: powers of two; "
              "qat: quantization-aware training", choices=METHODS),
        Param("bits", "int", 8, "bits per weight (uniform, log, qat)", low=2, high=8),
        Param("per_channel", "bool", True, "one scale per output channel, else one per "
              "tensor"),
        Param("calibration_rows", "int", 512, "training rows used to calibrate activation "
              "ranges (static_int8, qat)", low=16, high=100000),
        Param("finetune_epochs", "int", 3, "fine-tuning epochs with a straight-through "
              "estimator (qat; uniform/log: 0 quantizes without fine-tuning)",
              low=0, high=1000),
    ), terminal_methods=ONNX_METHODS)
def quantize(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Quantize a copy of `model` as `step["method"]` says; `model` is unchanged."""
    method = step["method"]
    if method in ONNX_METHODS:
        return _onnx_int8(model, step, ctx)
    if method == "fp16":
        return _fp16(model, ctx)
    return _weights(model, step, ctx, activations=method == "qat")


def _fp16(model: nn.Module, ctx: CompressContext) -> StepResult:
    out = clone(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.copy_(fp16_round(p))
    return StepResult(model=out, notes=[
        "Weights and biases rounded to float16 values; they stay float32 tensors so CPU "
        "inference runs, and the shipped file stores them in 16 bits."])


def _weights(model: nn.Module, step: dict, ctx: CompressContext, *,
             activations: bool) -> StepResult:
    """uniform, log (optionally fine-tuned) and qat (fine-tuned, activations too)."""
    bits, per_channel = step["bits"], step["per_channel"]
    scheme = "log" if step["method"] == "log" else "uniform"
    epochs = step["finetune_epochs"]
    out = clone(model)
    layers = prunable(out)
    if not layers:
        raise UserError(f"quantize {step['method']} acts on Linear and Conv layers and this "
                        f"model has none (a torch.export graph keeps no layers); use "
                        f"method dynamic_int8 or static_int8, which work on any model.")
    history = None
    if epochs > 0 or activations:
        history = _quantization_aware(out, layers, step, ctx, scheme=scheme,
                                      activations=activations)
    with torch.no_grad():
        for _, layer in layers:
            layer.weight.copy_(quantize_tensor(layer.weight, bits, scheme, per_channel))
    grid = "powers of two" if scheme == "log" else "an affine grid"
    notes = [f"{bits}-bit weights on {grid}, one grid per "
             f"{'output channel' if per_channel else 'tensor'}; biases stay float32; "
             f"zeros stay zeros."]
    if activations:
        notes.append(f"Inputs of every Linear/Conv layer fake-quantized to {ACTIVATION_BITS} "
                     f"bits with scales frozen after {epochs} fine-tuning epochs "
                     f"(straight-through estimator).")
    elif epochs > 0:
        notes.append(f"Fine-tuned {epochs} epochs with a straight-through estimator.")
    return StepResult(model=out, history=history or None, notes=notes)


def _quantization_aware(model: nn.Module, layers: list[tuple[str, nn.Module]], step: dict,
                        ctx: CompressContext, *, scheme: str,
                        activations: bool) -> dict[str, list[float]]:
    """Fine-tune `model` in place with fake-quantized weights (and activations when asked);
    afterwards the layers are plain again and the activation quantizers frozen."""
    from engine.models import set_training

    quantizers = _insert_activation_quantizers(model, layers) if activations else []
    originals = {}
    for name, layer in layers:
        originals[name] = type(layer)
        layer.__class__ = next(fq for base, fq in _FAKE_QUANT.items()
                               if isinstance(layer, base))
        layer.qat_bits, layer.qat_scheme = step["bits"], scheme
        layer.qat_per_channel = step["per_channel"]
    if quantizers:  # initial ranges from training rows, so 0 epochs still gives sane scales
        set_training(model, False)
        for q in quantizers:
            q.train()
        X = ctx.tensors["X_train"][:step["calibration_rows"]]
        with torch.no_grad():
            for i in range(0, len(X), CALIBRATION_BATCH):
                model(X[i:i + CALIBRATION_BATCH])
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


def _insert_activation_quantizers(model: nn.Module,
                                  layers: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """An ActivationFakeQuant named `<layer>_input_quant` before each layer in its parent
    nn.Sequential; the layers keep their names (`fc1.weight` stays `fc1.weight`)."""
    quantizers = []
    for name, _ in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, nn.Sequential):
            raise UserError(f"quantize qat inserts activation quantizers into sequential "
                            f"models, and layer {name!r} sits in a "
                            f"{type(parent).__name__}; use method uniform with "
                            f"finetune_epochs, or static_int8.")
        quantizer = ActivationFakeQuant().to(next(model.parameters()).device)
        entries = list(parent._modules.items())
        parent._modules.clear()
        for key, module in entries:
            if key == child:
                parent._modules[f"{child}_input_quant"] = quantizer
            parent._modules[key] = module
        quantizers.append(quantizer)
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


# --- ONNX Runtime int8 ---------------------------------------------------------------------

def _onnx_int8(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Export, quantize with onnxruntime.quantization, evaluate and time in ONNX Runtime.

    The file is in the QOperator format (QGemm, QLinearConv: integer kernels stored as
    such) rather than QDQ (float operators wrapped in QuantizeLinear/DequantizeLinear
    pairs): ONNX Runtime runs both with the same int8 kernels, but QDQ stores each bias
    with its own scale and zero-point arrays and needs three times the nodes, which for a
    small MLP costs a fifth of the file. The price is that only ONNX Runtime reads it."""
    from engine.export import compact, onnx_bytes

    method, per_channel = step["method"], step["per_channel"]
    float_bytes = compact(onnx_bytes(clone(model).cpu(), ctx.input_shape))
    int8_bytes, notes = quantize_onnx(float_bytes, method=method, per_channel=per_channel,
                                      calibration=ctx.tensors["X_train"][
                                          :step["calibration_rows"]])
    metrics = {**onnx_metrics(int8_bytes, ctx),
               "latency_ms": onnx_latency_ms(int8_bytes, ctx.input_shape),
               "reference_latency_ms": onnx_latency_ms(float_bytes, ctx.input_shape),
               "reference_size_bytes": len(float_bytes)}
    notes.append(f"{len(int8_bytes):,} bytes against {len(float_bytes):,} for the float32 "
                 f"ONNX file ({len(float_bytes) / len(int8_bytes):.2f}x smaller).")
    return StepResult(model=None, runtime="onnxruntime", onnx_bytes=int8_bytes,
                      metrics=metrics, notes=notes)


def quantize_onnx(float_bytes: bytes, *, method: str, per_channel: bool,
                  calibration: torch.Tensor | None = None) -> tuple[bytes, list[str]]:
    """(int8 .onnx bytes, notes) from a float .onnx file: `dynamic_int8`, or `static_int8`
    calibrated on `calibration` rows. Also used for uploaded ONNX models."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process

    from engine.export import compact

    granularity = "per output channel" if per_channel else "per tensor"
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "float.onnx").write_bytes(float_bytes)
        source = folder / "prepared.onnx"
        try:  # shape inference and graph fusions, which the quantizer relies on
            quant_pre_process(str(folder / "float.onnx"), str(source))
        except Exception as exc:  # an exotic graph: quantize it as exported
            source = folder / "float.onnx"
            notes.append(f"ONNX Runtime's pre-processing failed ({type(exc).__name__}); the "
                         f"model was quantized as exported.")
        target = folder / "int8.onnx"
        if method == "dynamic_int8":
            from onnxruntime.quantization import quantize_dynamic

            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             per_channel=per_channel)
            notes.insert(0, f"int8 weights ({granularity}); activations quantized on the "
                            f"fly per batch; ONNX Runtime only.")
        else:
            from onnxruntime.quantization import quantize_static

            quantize_static(str(source), str(target), _calibration_reader(calibration),
                            quant_format=QuantFormat.QOperator, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            notes.insert(0, f"int8 weights ({granularity}), uint8 activations with ranges "
                            f"calibrated (min/max) on {len(calibration)} training rows; "
                            f"QOperator format, ONNX Runtime only.")
        return compact(target.read_bytes()), notes


def _calibration_reader(X: torch.Tensor) -> Any:
    """Batches of `X` as onnxruntime's CalibrationDataReader hands them to the calibrator."""
    from onnxruntime.quantization import CalibrationDataReader

    array = X.detach().cpu().float().numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(array), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.batches, None)
            return None if i is None else {"input": array[i:i + CALIBRATION_BATCH]}

        def rewind(self) -> None:
            self.batches = iter(range(0, len(array), CALIBRATION_BATCH))

    return Reader()


class _SessionModule(nn.Module):
    """An ONNX Runtime session behind a module's call, so the torch evaluation (the same
    losses and metrics as every other variant) applies unchanged."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from engine.export import ort_predict

        return torch.from_numpy(ort_predict(self.session, x.detach().cpu().numpy())).to(x.device)


def onnx_metrics(model_bytes: bytes, ctx: CompressContext) -> dict[str, float]:
    """Test-split metrics of an ONNX model under ONNX Runtime, keyed as the torch
    evaluation keys them (test_loss, test_accuracy / test_mse, test_r2)."""
    from engine.export import ort_session

    scores = ctx.evaluate(_SessionModule(ort_session(model_bytes)), "test")
    return {f"test_{k}": v for k, v in scores.items()}


def onnx_latency_ms(model_bytes: bytes, input_shape: tuple[int, ...]) -> float:
    """Median milliseconds per batch-1 call, ONNX Runtime on one thread."""
    from engine.export import ort_session
    from engine.latency import time_calls

    session = ort_session(model_bytes, threads=1)
    feed = {session.get_inputs()[0].name: np.zeros((1, *input_shape), np.float32)}
    return time_calls(lambda: session.run(None, feed))["median_ms"]

