"""Int8 models for ONNX Runtime: the model exported, then quantized by onnxruntime.

`dynamic_int8` quantizes activations on the fly per batch; `static_int8` calibrates their
ranges on training rows. The variant runs in ONNX Runtime only, so it is evaluated and
timed here, and it ends a chain. `quantize_onnx` also serves uploaded ONNX models.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from engine.compress.base import CompressContext, StepResult, clone
from engine.compress.capabilities import CONV_DYNAMIC
from engine.export import SessionModule, compact, modernize, onnx_bytes, ort_session
from engine.metrics import rows_per_batch

CALIBRATION_BATCH = 256  # rows per calibration batch (static_int8 and qat), fewer for large
#   samples: ONNX Runtime's min/max calibrator merges batches exactly, and a batch of 128
#   crops at 224 px held 7.7 GB of activations


def calibration_batch(sample_shape: tuple[int, ...] | torch.Size) -> int:
    """Rows per calibration batch for samples of `sample_shape`: as an evaluation batch."""
    return min(CALIBRATION_BATCH, rows_per_batch(sample_shape))


def onnx_int8(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Export, quantize with onnxruntime.quantization and evaluate in ONNX Runtime (the
    runner times it, beside the float32 file it came from).

    The file is in the QOperator format (QGemm, QLinearConv: integer kernels stored as
    such) rather than QDQ (float operators wrapped in QuantizeLinear/DequantizeLinear
    pairs): ONNX Runtime runs both with the same int8 kernels, but QDQ stores each bias
    with its own scale and zero-point arrays and needs three times the nodes, which for a
    small MLP costs a fifth of the file. The price is that only ONNX Runtime reads it."""
    method, per_channel = step["method"], step["per_channel"]
    float_bytes = compact(onnx_bytes(clone(model).cpu(), ctx.input_shape))
    int8_bytes, notes = quantize_onnx(float_bytes, method=method, per_channel=per_channel,
                                      calibration=ctx.tensors["X_train"][
                                          :step["calibration_rows"]])
    metrics = {**onnx_metrics(int8_bytes, ctx), "reference_size_bytes": len(float_bytes)}
    notes.append(f"{len(int8_bytes):,} bytes against {len(float_bytes):,} for the float32 "
                 f"ONNX file ({len(float_bytes) / len(int8_bytes):.2f}x smaller).")
    if method == "dynamic_int8" and any(isinstance(m, nn.Conv1d | nn.Conv2d)
                                        for m in model.modules()):
        notes.insert(0, CONV_DYNAMIC)  # said before the figures, which will show it
    return StepResult(model=None, runtime="onnxruntime", onnx_bytes=int8_bytes,
                      metrics=metrics, notes=notes, reference_onnx=float_bytes)


def quantize_onnx(float_bytes: bytes, *, method: str, per_channel: bool,
                  calibration: torch.Tensor | None = None) -> tuple[bytes, list[str]]:
    """(int8 .onnx bytes, notes) from a float .onnx file: `dynamic_int8`, or `static_int8`
    calibrated on `calibration` rows. Also used for uploaded ONNX models."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process

    granularity = "per output channel" if per_channel else "per tensor"
    notes: list[str] = []
    float_bytes = modernize(float_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "float.onnx").write_bytes(float_bytes)
        source = folder / "prepared.onnx"
        try:  # shape inference and graph fusions, which the quantizer relies on
            quant_pre_process(str(folder / "float.onnx"), str(source),
                              skip_symbolic_shape=_token_axes(float_bytes))
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


def _token_axes(model_bytes: bytes) -> bool:
    """Whether an input has a dynamic axis after the batch axis (a text model's tokens).
    ONNX Runtime's symbolic shape inference cannot complete on such an attention graph:
    it fails, after writing a debug copy of the model into the working directory. ONNX's
    own shape inference, which still runs, is enough for the quantizer there."""
    graph = onnx.load_from_string(model_bytes).graph
    return any(not d.HasField("dim_value") for i in graph.input
               for d in i.type.tensor_type.shape.dim[1:])


def _calibration_reader(X: torch.Tensor) -> Any:
    """Batches of `X` as onnxruntime's CalibrationDataReader hands them to the calibrator."""
    from onnxruntime.quantization import CalibrationDataReader

    array = X.detach().cpu().float().numpy()
    batch = calibration_batch(array.shape[1:])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(array), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.batches, None)
            return None if i is None else {"input": array[i:i + batch]}

        def rewind(self) -> None:
            self.batches = iter(range(0, len(array), batch))

    return Reader()


def onnx_metrics(model_bytes: bytes, ctx: CompressContext) -> dict[str, float]:
    """Test-split metrics of an ONNX model under ONNX Runtime, keyed as the torch
    evaluation keys them (test_loss, test_accuracy / test_mse, test_r2)."""
    scores = ctx.evaluate(SessionModule(ort_session(model_bytes)), "test")
    return {f"test_{k}": v for k, v in scores.items()}


