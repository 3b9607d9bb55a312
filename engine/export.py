"""ONNX export and ONNX Runtime inference.

One exported file per model: a dynamic batch axis, input "input", output "output", all
weights inside the file (no external data), checked by `onnx.checker` before it is
returned. onnx and onnxruntime are imported inside the functions so `import engine` stays
light.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], *, opset: int = 18) -> bytes:
    """The model as one self-contained, checked .onnx file with a dynamic batch axis.

    Works for built-in models and for graphs from torch.export (`load_model` of a .pt2).
    Puts the model in evaluation mode (dropout off), as inference needs."""
    import onnx

    from engine.models import set_training

    set_training(model, False)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    # batch 2 in the example: an example batch of 1 would let the exporter specialize on it
    example = (torch.zeros((2, *input_shape), device=device),)
    dynamic = ({0: torch.export.Dim("batch")},)
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


def ort_session(model_bytes: bytes, *,
                threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimizations; `threads` intra-op threads
    when given (1 for a latency figure comparable across machines), else ORT's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=options,
                                providers=["CPUExecutionProvider"])


def ort_predict(session: onnxruntime.InferenceSession, X: np.ndarray,
                batch: int = 4096) -> np.ndarray:
    """The session's first output on `X`, run in batches of `batch` rows."""
    name = session.get_inputs()[0].name
    X = np.ascontiguousarray(X, dtype=np.float32)
    if len(X) == 0:
        out_shape = session.run(None, {name: np.zeros((1, *X.shape[1:]), np.float32)})[0]
        return np.zeros((0, *out_shape.shape[1:]), np.float32)
    outs = [session.run(None, {name: X[i:i + batch]})[0] for i in range(0, len(X), batch)]
    return np.concatenate(outs)


def compact(model_bytes: bytes) -> bytes:
    """The same model without what inference never reads, checked again.

    Drops the exporter's per-node metadata (stack traces), doc strings, intermediate shape
    annotations (`value_info`) and node names, and renames internal tensors to short ids
    (the graph's input and output keep their names). For a small model this metadata is a
    tenth of the file, which an int8 model should not carry."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    proto.doc_string = ""
    graph = proto.graph
    del graph.value_info[:]
    for node in graph.node:
        node.name, node.doc_string = "", ""
        del node.metadata_props[:]
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for node in graph.node for a in node.attribute)
    if not has_subgraphs and not graph.sparse_initializer:  # renaming stays within one graph
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
