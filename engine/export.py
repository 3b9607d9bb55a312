"""ONNX export and ONNX Runtime inference: sessions, predictions, evaluation and timing.

One exported file per model: a dynamic batch axis, input "input", output "output", all
weights inside the file (no external data), checked by `onnx.checker` before it is
returned. onnxruntime is imported inside the functions that run a session, so importing
this module stays light.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from engine.errors import UserError
from engine.latency import THREADS
from engine.models import set_training

if TYPE_CHECKING:
    import onnxruntime


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], *, opset: int = 18) -> bytes:
    """The model as one self-contained, checked .onnx file with a dynamic batch axis.

    Works for built-in models and for graphs from torch.export (`load_model` of a .pt2).
    Puts the model in evaluation mode (dropout off), as inference needs."""
    set_training(model, False)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    # batch 2 in the example: an example batch of 1 would let the exporter specialize on it
    example = (torch.zeros((2, *input_shape), device=device),)
    dynamic = ({0: torch.export.Dim("batch")},)
    if getattr(model, "takes_tokens", False):  # a text model: any number of tokens too
        dynamic = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")},)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                              input_names=["input"], output_names=["output"],
                              opset_version=opset, dynamic_shapes=dynamic, verbose=False)
        data = path.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


_SESSIONS: OrderedDict[tuple[bytes, int], onnxruntime.InferenceSession] = OrderedDict()
_SESSIONS_KEPT = 16


def default_threads() -> int:
    """The intra-op threads a session gets when none are asked for: torch's own count, so
    both runtimes share the cores the same way (and one setting moves both)."""
    return max(1, torch.get_num_threads())


def ort_session(model_bytes: bytes, *,
                threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session with every graph optimization on and a deliberate thread
    count: `threads` intra-op threads (1 for a latency figure comparable across machines),
    else `default_threads()`; one inter-op thread, sequential execution (these graphs are
    chains, nothing runs in parallel branches).

    Sessions are built once and reused: the same bytes and thread count return the same
    session (an LRU of 16), since building one (graph optimization, kernel selection) costs
    milliseconds while a small model's call costs microseconds. `run` is thread-safe."""
    import onnxruntime as ort

    n = int(threads) if threads is not None else default_threads()
    key = (hashlib.sha256(model_bytes).digest(), n)
    session = _SESSIONS.get(key)
    if session is not None:
        _SESSIONS.move_to_end(key)
        return session
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = n
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, sess_options=options,
                                   providers=["CPUExecutionProvider"])
    _SESSIONS[key] = session
    while len(_SESSIONS) > _SESSIONS_KEPT:
        _SESSIONS.popitem(last=False)
    return session


def ort_predict(session: onnxruntime.InferenceSession, X: np.ndarray,
                batch: int = 4096, pad_id: int | None = None) -> np.ndarray:
    """The session's first output on `X`, run in batches of `batch` rows (fewer for large
    samples: at most 2^21 input values a batch, as `metrics.evaluate`)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    batch = max(1, min(batch, 2**21 // max(1, int(np.prod(X.shape[1:])))))
    if len(X) == 0:
        out_shape = session.run(None, ort_inputs(session, np.zeros((1, *X.shape[1:]),
                                                                   np.float32), pad_id))[0]
        return np.zeros((0, *out_shape.shape[1:]), np.float32)
    outs = [session.run(None, ort_inputs(session, X[i:i + batch], pad_id))[0]
            for i in range(0, len(X), batch)]
    return np.concatenate(outs)


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer gives


def ort_inputs(session: onnxruntime.InferenceSession, X: np.ndarray,
               pad_id: int | None = None) -> dict[str, np.ndarray]:
    """The feed of a session for rows `X` as the engine holds them: the one input as it is,
    or, for a text model (a shipped one, or an uploaded transformer), what a tokenizer
    gives: `input_ids`, `attention_mask` where the ids are not the padding id (`pad_id`,
    else the file's metadata, else 0) and `token_type_ids` of one segment (zeros), as
    int64, each where the file takes it."""
    names = [i.name for i in session.get_inputs()]
    if "input_ids" not in names:
        return {names[0]: np.ascontiguousarray(X, dtype=np.float32)}
    other = [n for n in names if n not in TOKEN_INPUTS]
    if other:
        raise UserError(f"this ONNX model also takes the input {other[0]!r}, which a "
                        f"tokenizer does not give (only {', '.join(TOKEN_INPUTS)}); export "
                        f"it with those inputs alone.")
    if pad_id is None:
        pad_id = int(session.get_modelmeta().custom_metadata_map.get("pad_id", 0))
    ids = np.ascontiguousarray(X, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids != pad_id).astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}
    return {name: feed[name] for name in names}


def compact(model_bytes: bytes) -> bytes:
    """The same model without what inference never reads, checked again.

    Drops the exporter's per-node metadata (stack traces), doc strings, intermediate shape
    annotations (`value_info`) and node names, and renames internal tensors to short ids
    (the graph's input and output keep their names). For a small model this metadata is a
    tenth of the file, which an int8 model should not carry."""
    proto = onnx.load_from_string(model_bytes)
    proto.doc_string = ""
    graph = proto.graph
    del graph.value_info[:]
    for node in graph.node:
        node.name, node.doc_string = "", ""
        del node.metadata_props[:]
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for node in graph.node for a in node.attribute)
    # renaming stays within one graph; before IR 4 an initializer must also be a graph
    # input of the same name, so old files keep their names
    if not has_subgraphs and not graph.sparse_initializer and proto.ir_version >= 4:
        keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
        short: dict[str, str] = {}

        def rename(name: str) -> str:
            return name if name in keep else short.setdefault(name, format(len(short), "x"))

        for tensor in graph.initializer:
            tensor.name = rename(tensor.name)
        for node in graph.node:
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


class SessionModule(nn.Module):
    """An ONNX Runtime session behind a module's call, so the torch evaluation (the same
    losses and metrics as every other variant) applies unchanged."""

    def __init__(self, session: onnxruntime.InferenceSession,
                 pad_id: int | None = None) -> None:
        super().__init__()
        self.session, self.pad_id = session, pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ort_predict(self.session, x.detach().cpu().numpy(), pad_id=self.pad_id)
        return torch.from_numpy(out).to(x.device)


def ort_call(model_bytes: bytes, input_shape: tuple[int, ...], *,
             threads: int = THREADS) -> Callable[[], Any]:
    """One batch-1 ONNX Runtime call on a zero input (token id 0 for a text model), at
    `threads`, for `round_robin`."""
    session = ort_session(model_bytes, threads=threads)
    feed = ort_inputs(session, np.zeros((1, *input_shape), np.float32))
    return lambda: session.run(None, feed)


PACK_MIN_SAVING = 0.2  # a weight is repacked only when that saves at least this fraction


def pack_weights(model_bytes: bytes) -> tuple[bytes, list[str]]:
    """The same model with the weights compression left few values in stored as such, so
    the file ONNX Runtime runs carries the compression (at load time the small graph in
    front of each weight is folded back into a float tensor; the outputs are identical):

    - at most 256 distinct values (weight sharing, per-tensor k-bit): uint8 indices into a
      float32 codebook, `Cast` + `Gather` (at most 16: uint4 indices, two to a byte);
    - a k-bit affine grid per row (per-channel k-bit): uint8 levels, a step and an offset
      per row, `Cast` + `Mul` + `Add` (a DequantizeLinear with a float zero point);
    - else at most 256 values per row: uint8 indices into one codebook per row,
      `Cast` + `GatherElements` + `Reshape`;
    - exact float16 values (fp16): a float16 tensor and a `Cast`.
    Indices and levels that fit 4 bits are stored as uint4 (ONNX's UINT4, opset 21 and IR
    version 10, which the file is raised to then), so a 4-bit model is 8x, not 4x, smaller
    than float32. Returns the bytes and one sentence per kind of packing done (none: the
    file as it was)."""
    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    front, kept, packed = [], [], {"codebook": 0, "affine rows": 0, "row codebooks": 0,
                                   "float16": 0}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        parts = _packed(tensor.name, array) if array.dtype == np.float32 and \
            array.ndim >= 2 else None
        if parts is None:
            kept.append(tensor)
            continue
        kind, initializers, nodes = parts
        if sum(t.ByteSize() for t in initializers) > (1 - PACK_MIN_SAVING) * tensor.ByteSize():
            kept.append(tensor)
            continue
        packed[kind] += 1
        kept.extend(initializers)
        front.extend(nodes)
    if not front:
        return model_bytes, []
    if any(t.data_type == onnx.TensorProto.UINT4 for t in kept):  # Cast from uint4: opset 21
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, 21)
        proto.ir_version = max(proto.ir_version, 10)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(front + nodes)
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    said = [f"{n} weight tensor(s) as {kind}" for kind, n in packed.items() if n]
    return data, [f"The ONNX file stores {', '.join(said)} ({len(model_bytes):,} -> "
                  f"{len(data):,} bytes); ONNX Runtime unpacks them when it loads the file."]


def _packed(name: str, w: np.ndarray) -> tuple[str, list[Any], list[Any]] | None:
    """(kind, new initializers, nodes that rebuild `name`) for one weight, the smallest of
    the packings that reproduce it, or None."""
    found = [c for c in _candidates(name, w) if c is not None]
    return min(found, key=lambda c: sum(t.ByteSize() for t in c[1])) if found else None


def _candidates(name: str, w: np.ndarray) -> Iterator[tuple[str, list[Any], list[Any]] | None]:
    helper = onnx.helper
    values, idx = np.unique(w, return_inverse=True)
    if len(values) <= 256:
        yield "codebook", [numpy_helper.from_array(values.astype(np.float32), f"{name}.book"),
                            _levels(idx.reshape(w.shape), f"{name}.idx")], [
            helper.make_node("Cast", [f"{name}.idx"], [f"{name}.idx64"],
                             to=onnx.TensorProto.INT64),
            helper.make_node("Gather", [f"{name}.book", f"{name}.idx64"], [name], axis=0)]
    rows = w.reshape(len(w), -1)
    grid = _row_grids(rows)
    if grid is not None:  # lo + step * q per row, q in 0..255: a k-bit affine grid
        lo, step, q = grid
        bshape = [len(w)] + [1] * (w.ndim - 1)
        yield "affine rows", [
            _levels(q.reshape(w.shape), f"{name}.q"),
            numpy_helper.from_array(step.reshape(bshape), f"{name}.step"),
            numpy_helper.from_array(lo.reshape(bshape), f"{name}.lo")], [
            helper.make_node("Cast", [f"{name}.q"], [f"{name}.qf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}.qf", f"{name}.step"], [f"{name}.scaled"]),
            helper.make_node("Add", [f"{name}.scaled", f"{name}.lo"], [name])]
    books = [np.unique(r, return_inverse=True) for r in rows]
    width = max(len(b) for b, _ in books)
    if width <= 256:
        book = np.stack([np.pad(b, (0, width - len(b))) for b, _ in books]).astype(np.float32)
        index = np.stack([i for _, i in books]).astype(np.uint8)
        shape = np.array(w.shape, dtype=np.int64)
        yield "row codebooks", [
            numpy_helper.from_array(book, f"{name}.book"),
            _levels(index, f"{name}.idx"),
            numpy_helper.from_array(shape, f"{name}.shape")], [
            helper.make_node("Cast", [f"{name}.idx"], [f"{name}.idx64"],
                             to=onnx.TensorProto.INT64),
            helper.make_node("GatherElements", [f"{name}.book", f"{name}.idx64"],
                             [f"{name}.rows"], axis=1),
            helper.make_node("Reshape", [f"{name}.rows", f"{name}.shape"], [name])]
    half = w.astype(np.float16)
    if np.array_equal(half.astype(np.float32), w):
        yield "float16", [numpy_helper.from_array(half, f"{name}.f16")], [
            helper.make_node("Cast", [f"{name}.f16"], [name], to=onnx.TensorProto.FLOAT)]


def _levels(array: np.ndarray, name: str) -> Any:
    """Indices or grid levels as an initializer: uint4 (two to a byte) when they fit."""
    if not array.size or int(array.max()) >= 16:
        return numpy_helper.from_array(array.astype(np.uint8), name)
    flat = np.append(array.astype(np.uint8).ravel(), np.uint8(0))[:array.size + array.size % 2]
    packed = flat[0::2] | (flat[1::2] << 4)  # the first of each pair in the low 4 bits
    return onnx.helper.make_tensor(name, onnx.TensorProto.UINT4, array.shape,
                                   packed.tobytes(), raw=True)


def _row_grids(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(lo, step, q) with every row equal to lo + step * q (q uint8) to within 1e-6 of its
    range, trying the grids of 1 to 8 bits; None when some row fits none."""
    lo, hi = rows.min(1), rows.max(1)
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    for bits in range(1, 9):
        step = (span / (2 ** bits - 1)).astype(np.float32)
        q = np.rint((rows - lo[:, None]) / step[:, None])
        if np.all(np.abs(lo[:, None] + step[:, None] * q - rows) <= 1e-6 * span[:, None]):
            return lo.astype(np.float32), step, q.astype(np.uint8)
    return None


def modernize(model_bytes: bytes) -> bytes:
    """A file from before ONNX IR 4 (model-zoo graphs) as IR 4: there, every initializer
    had to be a graph input too, which the quantizer treats as a value fed at run time (so
    it quantizes nothing) and its output breaks (new initializers are not inputs)."""
    proto = onnx.load_from_string(model_bytes)
    if proto.ir_version >= 4:
        return model_bytes
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto.ir_version = 4
    return proto.SerializeToString()
