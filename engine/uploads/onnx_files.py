"""ONNX files: parsed as inert protobuf, their external data kept inside the model's folder."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from engine.errors import UserError
from engine.uploads.archives import Source, check_size, entry_parts, label, read_all


def onnx_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse ones, node attributes, subgraphs
    and functions."""
    def graph_tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from nodes_tensors(graph.node)

    def nodes_tensors(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(proto.graph)
    for function in proto.functions:
        yield from nodes_tensors(function.node)


def check_onnx(source: Source, name: str | None = None, *,
               allow_external: bool = True) -> None:
    """Refuse an ONNX model that cannot be parsed, or whose external-data `location` is
    absolute, climbs out with '..', or resolves (through links) outside the model's folder.
    `allow_external=False` (an upload on its own) refuses external data altogether."""
    name = label(source, name)
    check_size(source, name)
    try:
        proto = onnx.load_model_from_string(read_all(source))
        tensors = list(onnx_tensors(proto))
    except Exception:  # protobuf's parse errors have no common base class
        raise UserError(f"{name} is not a readable ONNX model; export it again with "
                        f"torch.onnx.export.") from None
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not allow_external or isinstance(source, bytes):
            raise UserError(f"{name} keeps tensor {tensor.name!r} in an external file "
                            f"({location!r}), which an upload cannot bring along; save the "
                            f"model with its weights inside (onnx.save without "
                            f"save_as_external_data).")
        folder = Path(source).resolve().parent
        parts = entry_parts(location)
        target = (folder / location).resolve()
        if (not location or "\x00" in location or location.startswith(("/", "\\"))
                or re.match(r"[A-Za-z]:", location) or ".." in parts
                or not target.is_relative_to(folder)):
            raise UserError(f"{name} keeps tensor {tensor.name!r} in {location!r}, outside "
                            f"the model's own folder, which is never read; save the model "
                            f"with its weights inside or next to it.")


