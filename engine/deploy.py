"""Deployment: the ONNX file a user ships, and what ONNX Runtime makes of it.

The exported file takes the raw inputs a user has (input "input", float32, shape
(batch, *raw sample shape)): the feature selection and scaling fitted on the training part
are a small graph in front of the model, joined with `onnx.compose`, so the same front
serves float and int8 models alike. Every export is checked (`onnx.checker`), compared
with PyTorch on the test part (the largest difference and the tolerance are recorded; a
variant outside it is marked, not hidden), and evaluated with ONNX Runtime: the accuracy
shown for a deployed variant is the file's own. Latency and throughput come from one
harness for PyTorch eager and ONNX Runtime (CPU, and CUDA where it is available), with the
thread count and the machine's description.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import compose, version_converter
from torch import nn

from engine.bundle import is_bundle, load_bundle
from engine.data import load_data
from engine.errors import UserError
from engine.export import (
    modernize,
    onnx_bytes,
    ort_inputs,
    ort_predict,
    ort_session,
    pack_weights,
)
from engine.latency import BUDGET_S, machine, time_calls, torch_latency
from engine.metrics import cosine, predict, r2, rows_per_batch, score_outputs
from engine.models import set_training
from engine.recipe import Recipe, short_source
from engine.sections import resolve_sections

OPSET = 18
TEXT_INPUTS = ("input_ids", "attention_mask")  # a shipped text model's inputs, int64
TOLERANCE = 1e-4  # relative to the largest output magnitude


class Preprocessing(nn.Module):
    """x -> (x[:, keep] - shift) / scale, reshaped to the model's input shape."""

    def __init__(self, prep: Any, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.select = prep.keep is not None
        self.scaled = prep.shift is not None
        if self.select:
            self.register_buffer("keep", torch.as_tensor(np.asarray(prep.keep), dtype=torch.long))
        if self.scaled:
            self.register_buffer("shift", torch.as_tensor(prep.shift, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(prep.scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.select:
            x = x.reshape(x.shape[0], -1).index_select(1, self.keep)
        x = x.reshape((x.shape[0], *self.input_shape))
        if self.scaled:
            x = (x - self.shift) / self.scale
        return x


class TextFront(nn.Module):
    """(input_ids, attention_mask) as a tokenizer gives them -> the token ids the model
    takes, as numbers, with the masked positions set to the padding id."""

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pad = torch.full_like(input_ids, self.pad_id)
        return torch.where(attention_mask > 0, input_ids, pad).float()


def _text_front(pad_id: int) -> bytes:
    example = (torch.ones((2, 8), dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "front.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(TextFront(pad_id), example, str(path), dynamo=True,
                              external_data=False, input_names=list(TEXT_INPUTS),
                              output_names=["output"], opset_version=OPSET,
                              dynamic_shapes=(axes, axes), verbose=False)
        return path.read_bytes()


def with_preprocessing(model_onnx: bytes, data: Any) -> bytes:
    """Prepend the data's fitted preprocessing to an exported model (float or int8); a text
    model's file takes `input_ids` and `attention_mask` instead, as its tokenizer gives."""
    raw_shape = tuple(data.X_test_raw.shape[1:])
    text = getattr(data, "text", None)
    front = onnx.load_from_string(
        _text_front(text["pad_id"]) if text else
        onnx_bytes(Preprocessing(data.preprocess, data.input_shape), raw_shape, opset=OPSET))
    back = onnx.load_from_string(modernize(model_onnx))  # a model-zoo file lists its weights
    #   as inputs (IR 3): only its real input is fed
    versions = {op.domain or "ai.onnx": op.version for op in back.opset_import}
    version = versions.get("ai.onnx")
    if version is not None and version < OPSET:  # an uploaded file of an older opset
        try:
            back = version_converter.convert_version(back, OPSET)
            versions["ai.onnx"] = OPSET
        except Exception as exc:
            raise UserError(f"this ONNX file's opset {version} could not be converted to "
                            f"{OPSET} to put the data's preprocessing in front of it "
                            f"({str(exc).splitlines()[0][:160]}); export it from its own "
                            f"framework at opset {OPSET} or later and upload that.") from None
    names = back.graph.input[0].name, back.graph.output[0].name
    front = compose.add_prefix(front, "pre_")
    back = compose.add_prefix(back, "model_")
    front.ir_version = back.ir_version = max(front.ir_version, back.ir_version)
    for op in front.opset_import:  # a 4-bit file is opset 21: the scaling's few ops agree
        op.version = max(op.version, versions.get(op.domain or "ai.onnx", op.version))
    merged = compose.merge_models(front, back, io_map=[("pre_output", f"model_{names[0]}")])
    public = {f"pre_{name}": name for name in (TEXT_INPUTS if text else ("input",))}
    for item in merged.graph.input:
        item.name = public.get(item.name, item.name)
    merged.graph.output[0].name = "output"
    for node in merged.graph.node:  # keep the public names: "input" (or the text inputs)
        node.input[:] = [public.get(i, i) for i in node.input]
        node.output[:] = ["output" if o == f"model_{names[1]}" else o for o in node.output]
    if text:
        onnx.helper.set_model_props(merged, {"pad_id": str(text["pad_id"])})
    try:
        onnx.checker.check_model(merged, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the ONNX file with the preprocessing in front does not pass ONNX's "
                        f"checker ({str(exc).splitlines()[0][:160]}); export the model from "
                        f"its own framework again and upload that.") from None
    return merged.SerializeToString()


def export_model(model: nn.Module, data: Any, *, name: str = "model") -> bytes:
    """The deployable .onnx bytes of a PyTorch model, its preprocessing inside."""
    try:
        core = onnx_bytes(model, data.input_shape, opset=OPSET)
    except UserError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"{name} could not be exported to ONNX ({type(exc).__name__}: "
                        f"{reason}); export its model as a built-in architecture or keep it "
                        f"in PyTorch.") from None
    packed, _ = pack_weights(core)  # shared, k-bit and fp16 weights stored as such
    return with_preprocessing(packed, data)


def _scores(out: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    if task == "classification":
        return {"accuracy": score_outputs(out, y, task)}
    pred = out.reshape(y.shape)
    scores = {"mse": float(((y - pred) ** 2).mean()), "r2": r2(y, pred)}
    if y.ndim == 2:  # a label-free teacher's output vectors
        scores["cosine"] = cosine(torch.as_tensor(pred), torch.as_tensor(y))
    return scores


def report(file: bytes, data: Any, *, model: nn.Module | None = None, threads: int = 1,
           batch: int = 256, torch_batch1: bool = True) -> dict[str, Any]:
    """Check, evaluate and time an exported file; with `model`, compare it with PyTorch.
    Throughput is timed at `batch` rows, fewer for large samples (an evaluation batch's
    bound: 13 photos of 224x224, where 256 took minutes a call and gigabytes).
    `torch_batch1=False` leaves out PyTorch's batch-1 latency: a run's variants have theirs
    already (`latency_ms`, measured once in the harness's rounds), and a second figure for
    the same thing would disagree with it."""
    proto = onnx.load_from_string(file)
    X_raw, y = data.X_test_raw, data.y_test
    batch = min(batch, rows_per_batch(X_raw.shape[1:]))
    session = ort_session(file, threads=threads)
    out = ort_predict(session, X_raw)
    info: dict[str, Any] = {
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "input": _input_spec(data),
        "output": {"name": "output", "shape": ["batch", *out.shape[1:]],
                   "meaning": "class logits" if data.task == "classification"
                   else "prediction"},
        "bytes": len(file), "threads": threads, "machine": machine(),
        "onnx": _scores(out, y, data.task),
        "latency": {"onnxruntime_cpu": _ort_timing(file, X_raw, threads, batch)},
    }
    cuda = _ort_cuda_timing(file, X_raw, batch)
    if cuda:
        info["latency"]["onnxruntime_cuda"] = cuda
    if model is not None:
        set_training(model, False)
        device = next(iter(model.parameters()), torch.zeros(())).device
        with torch.no_grad():
            ref = predict(model, data.X_test)
        diff = float(np.abs(ref.reshape(out.shape) - out).max()) if len(out) else 0.0
        tol = TOLERANCE * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        info.update(torch=_scores(ref, y, data.task), max_abs_diff=diff, tolerance=tol,
                    parity_ok=diff <= tol)
        info["latency"]["torch_eager"] = _torch_timing(model, data.input_shape, batch, device,
                                                       batch1=torch_batch1)
    return info


def _input_spec(data: Any) -> dict[str, Any]:
    """What the shipped file takes: raw rows, or a text model's token ids and mask."""
    if getattr(data, "text", None):
        return {"names": list(TEXT_INPUTS), "shape": ["batch", "tokens"], "dtype": "int64",
                "preprocessing": f"tokenize with the model's tokenizer "
                                 f"({short_source(data.text['tokenizer'])}); any number of "
                                 f"tokens up to {data.text['max_length']}",
                "tokenizer": data.text["tokenizer"], "max_length": data.text["max_length"]}
    return {"name": "input", "shape": ["batch", *data.X_test_raw.shape[1:]],
            "dtype": "float32",
            "preprocessing": "inside the file: feature selection and scaling fitted on the "
                             "training part",
            **({"columns": data.encoding} if data.encoding else {})}


def _ort_timing(file: bytes, X: np.ndarray, threads: int, batch: int) -> dict[str, float]:
    session = ort_session(file, threads=threads)
    one = ort_inputs(session, X[:1])
    many = ort_inputs(session, np.resize(X, (batch, *X.shape[1:])))
    single = time_calls(lambda: session.run(None, one), repeats=300, budget_s=BUDGET_S)
    bulk = time_calls(lambda: session.run(None, many), repeats=30, budget_s=BUDGET_S)
    return {"median_ms": single["median_ms"], "p95_ms": single["p95_ms"],
            "throughput_per_s": batch / (bulk["median_ms"] / 1e3), "batch": batch,
            "calls": single["calls"], "batch_calls": bulk["calls"]}


def _ort_cuda_timing(file: bytes, X: np.ndarray, batch: int) -> dict[str, float] | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    session = ort.InferenceSession(file, providers=["CUDAExecutionProvider"])
    one = ort_inputs(session, X[:1])
    many = ort_inputs(session, np.resize(X, (batch, *X.shape[1:])))
    single = time_calls(lambda: session.run(None, one), repeats=300, budget_s=BUDGET_S)
    bulk = time_calls(lambda: session.run(None, many), repeats=30, budget_s=BUDGET_S)
    return {"median_ms": single["median_ms"], "p95_ms": single["p95_ms"],
            "throughput_per_s": batch / (bulk["median_ms"] / 1e3), "batch": batch,
            "calls": single["calls"], "batch_calls": bulk["calls"]}


def _torch_timing(model: nn.Module, input_shape: tuple[int, ...], batch: int,
                  device: torch.device, *, batch1: bool = True) -> dict[str, float]:
    bulk = torch_latency(model, input_shape, batch=batch, repeats=30, budget_s=BUDGET_S)
    out = {"throughput_per_s": batch / (bulk["median_ms"] / 1e3), "batch": batch,
           "batch_calls": bulk["calls"]}
    if batch1:
        single = torch_latency(model, input_shape, repeats=300, budget_s=BUDGET_S)
        out.update(median_ms=single["median_ms"], p95_ms=single["p95_ms"],
                   calls=single["calls"])
    return out


def predict_snippet(file_name: str, info: dict[str, Any], class_names: list[str] | None
                    ) -> str:
    """A small predict.py a user runs next to the downloaded file on their own data: a
    table's CSV rows (each input built from its column as the model was trained), or an
    .npy array of raw samples."""
    columns = info["input"].get("columns")
    labels = (f"CLASSES = {class_names!r}\n" if class_names else "")
    decide = ("for i in scores.argmax(1):\n    print(CLASSES[int(i)])" if class_names
              else "for v in scores.ravel():\n    print(float(v))")
    head = f'''"""Run {file_name} with ONNX Runtime: pip install onnxruntime numpy'''
    if info["input"].get("names") == list(TEXT_INPUTS):
        return _text_snippet(file_name, info, labels, class_names)
    if columns:
        inputs = ",\n".join(f"    ({c['column']!r}, {c.get('equals')!r})" for c in columns)
        return f'''{head}

    python predict.py rows.csv   # a CSV with the columns the model was trained on
"""
import csv
import sys

import numpy as np
import onnxruntime as ort

{labels}# the model's inputs in order: a numeric column as it is, or (column, value) as 1.0 when
# the row's text equals value, else 0.0; the scaling fitted on the training part is inside
INPUTS = [
{inputs},
]


def encode(row):
    return [float(row[c]) if v is None else float(row[c].strip().lower() == v.lower())
            for c, v in INPUTS]


with open(sys.argv[1], newline="", encoding="utf-8") as f:
    x = np.array([encode(row) for row in csv.DictReader(f)], dtype=np.float32)
session = ort.InferenceSession("{file_name}", providers=["CPUExecutionProvider"])
scores = session.run(None, {{"input": x}})[0]
{decide}
'''
    shape = ", ".join(map(str, info["input"]["shape"][1:]))
    return f'''{head}

    python predict.py samples.npy   # raw samples, shape (n, {shape}), as in your data
"""
import sys

import numpy as np
import onnxruntime as ort

{labels}x = np.load(sys.argv[1]).astype(np.float32)  # the scaling is inside the file
session = ort.InferenceSession("{file_name}", providers=["CPUExecutionProvider"])
scores = session.run(None, {{"input": x}})[0]
{decide}
'''


def _text_snippet(file_name: str, info: dict[str, Any], labels: str,
                  class_names: list[str] | None) -> str:
    """predict.py of a text model: each line of a text file tokenized by the model's own
    tokenizer (its folder beside the file, as `tokenizer/`), one prediction per line."""
    limit = info["input"]["max_length"]
    decide = ("for text, i in zip(texts, scores.argmax(1)):\n    print(CLASSES[int(i)], text, "
              "sep='\\t')" if class_names else
              "for text, v in zip(texts, scores):\n    print(text, np.round(v, 4).tolist(), "
              "sep='\\t')")
    return f'''"""Run {file_name} with ONNX Runtime: pip install onnxruntime numpy transformers

    python predict.py texts.txt   # one text per line; the model's tokenizer in tokenizer/
"""
import sys

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

{labels}tokenizer = AutoTokenizer.from_pretrained("tokenizer", local_files_only=True)
with open(sys.argv[1], encoding="utf-8") as f:
    texts = [line.strip() for line in f if line.strip()]
enc = tokenizer(texts, truncation=True, max_length={limit}, padding=True, return_tensors="np")
session = ort.InferenceSession("{file_name}", providers=["CPUExecutionProvider"])
scores = session.run(None, {{"input_ids": enc["input_ids"].astype(np.int64),
                             "attention_mask": enc["attention_mask"].astype(np.int64)}})[0]
{decide}
'''


def export_stored(recipe: dict[str, Any], model_file: str, *, name: str
                  ) -> tuple[bytes, dict[str, Any]]:
    """Export a stored variant (its model bundle, or the .onnx of an int8 variant) with the
    preprocessing of its run's data, and report on it."""
    checked = resolve_sections(Recipe.from_dict(recipe))
    data = load_data(checked.data, seed=checked.seed, model_source=checked.model.source)
    path = Path(model_file)
    if not (path.is_file() or is_bundle(path)):
        raise UserError(f"the model of {name} is gone ({path.name}); run the recipe "
                        f"again to recreate it.")
    if path.suffix == ".onnx":
        file = with_preprocessing(path.read_bytes(), data)
        return file, report(file, data)
    model = load_bundle(path)
    file = export_model(model, data, name=name)
    return file, report(file, data, model=model, torch_batch1=False)  # the run timed it
