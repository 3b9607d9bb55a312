"""Every model source, and the complexity figures of any model.

`build_model` makes the model a recipe names: a built-in (`engine.architectures`), a
transformers architecture (`hfarch:NAME`, random init) or a local Hugging Face folder
(`hf:PATH`, `engine.hf`), a model bundle the workbench wrote (`engine.bundle`), or an
uploaded file. Uploads are loaded without unpickling arbitrary
objects: every file first passes `engine.uploads.check_model_file` (size cap, ZIP checks, and
a `pickletools` scan of every pickle inside against an allow-list of tensor rebuilders,
whatever the extension), then `.pt2` goes through `torch.export.load`, `.pt` state_dicts
through `torch.load(weights_only=True)`, TorchScript through `torch.jit.load`. `.onnx` files
have no PyTorch module; they pass `engine.uploads.check_onnx` (external data stays in the
model's folder), get their complexity figures here and run under ONNX Runtime only.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch._export.converter import TS2EPConverter
from torch.utils.flop_counter import FlopCounterMode

from engine.architectures import MODELS, build_builtin, check_fits
from engine.bundle import is_bundle, load_bundle, read_meta
from engine.errors import UserError
from engine.graphs import from_program
from engine.hf import build_hf_source, hf_class_names, is_hf_source
from engine.hf_text import build_text_source, is_text_folder, text_outputs
from engine.recipe import ModelConfig
from engine.uploads import check_model_file, check_onnx, onnx_tensors

# Denormal floats take a slow path on x86 CPUs (10-100x per operation): a random-init
# EfficientNet-B0's activations decay into them, and its forward pass took 3.5 s instead of
# 0.38 s. Values below 1.2e-38 become zero, for every model the engine builds or loads.
torch.set_flush_denormal(True)

__all__ = ["MODELS", "build_model", "check_fits", "complexity", "describe", "layer_names",
           "layer_table", "load_model", "onnx_complexity", "own_outputs", "read_onnx", "save_model",
           "set_training"]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int, *,
                seed: int) -> nn.Module:
    """A fresh built-in model, or the uploaded one, ready to train on this data."""
    torch.manual_seed(seed)  # the initialization is part of the recipe's determinism
    if cfg.source.startswith("builtin:"):
        model = build_builtin(cfg, cfg.source.removeprefix("builtin:"), input_shape, n_out)
    elif is_text_folder(cfg.source):
        model = build_text_source(cfg.source, n_out, input_shape)
    elif is_hf_source(cfg.source):
        model = build_hf_source(cfg, input_shape, n_out)
    elif is_bundle(cfg.source):
        model = load_bundle(cfg.source)
    else:
        model = load_model(cfg, input_shape, n_out)
    check_fits(model, input_shape, n_out)
    return model


def load_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    """Load an uploaded model file; never unpickles arbitrary Python objects."""
    path = Path(cfg.source)
    if not path.is_file():
        raise UserError(f"model file {cfg.source!r} does not exist; check the path.")
    check_model_file(path)  # before any loader: no pickle outside the allow-list gets through
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise UserError("an ONNX model has no PyTorch weights to train or fine-tune; a run "
                        "evaluates it with ONNX Runtime as it is (engine.run), or upload a "
                        ".pt2 (torch.export.save) or a state_dict to train it.")
    if suffix == ".pt2":
        try:
            return from_program(torch.export.load(str(path)))
        except Exception as exc:
            raise UserError(f"{path.name} is not a readable torch.export archive "
                            f"({type(exc).__name__}); export it with torch.export.save.") from None
    if suffix in (".pt", ".pth"):
        if _is_torchscript(path):
            return _from_torchscript(path, input_shape)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"{path.name} holds pickled Python objects, which are never "
                            f"loaded; save a state_dict (torch.save(model.state_dict(), path)) "
                            f"or export with torch.export.save.") from None
        return _from_state_dict(state, cfg, input_shape, n_out, path.name)
    raise UserError(f"model files must end in .pt2, .pt, .pth or .onnx, got {path.name!r}.")


def _from_torchscript(path: Path, input_shape: tuple[int, ...]) -> nn.Module:
    """TorchScript, converted to a torch.export graph so every later step sees one format."""
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise UserError(f"{path.name} is not a readable TorchScript archive "
                        f"({type(exc).__name__}); export the model with torch.export.save "
                        f"instead.") from None
    try:
        graph = TS2EPConverter(script, (torch.zeros((2, *input_shape)),)).convert().module()
    except Exception as exc:
        raise UserError(f"{path.name} is TorchScript that could not be converted for training "
                        f"({type(exc).__name__}); export the model with torch.export.save "
                        f"instead.") from None
    # the converter keeps the weights as buffers; make the script's parameters trainable again
    for name, _ in script.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(owner_name)
        tensor = owner._buffers.pop(leaf, None)
        if tensor is not None:
            owner.register_parameter(leaf, nn.Parameter(tensor))
    try:  # exported again, now with parameters, so its layers can be made visible
        program = torch.export.export(graph, (torch.zeros((2, *input_shape)),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:
        raise UserError(f"{path.name} is TorchScript whose converted graph could not be "
                        f"exported again ({type(exc).__name__}); export the model with "
                        f"torch.export.save instead.") from None
    return from_program(program)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with code/ and constants.pkl next to data.pkl."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _from_state_dict(state: Any, cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int,
                     name: str) -> nn.Module:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"{name} is not a state_dict (a mapping of names to tensors); save it "
                        f"with torch.save(model.state_dict(), path).")
    if cfg.architecture is None:
        raise UserError(f"{name} is a state_dict; set model.architecture to the built-in "
                        f"architecture it belongs to ({', '.join(MODELS.names())}).")
    model = build_builtin(cfg, cfg.architecture, input_shape, n_out)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{name} does not match {cfg.architecture} with these settings: missing "
                        f"{missing or 'nothing'}, unexpected {unexpected or 'nothing'}; check "
                        f"model.hidden, model.channels and model.architecture.")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"{name}: {key} has shape {tuple(state[key].shape)} but "
                            f"{cfg.architecture} on this data needs {tuple(tensor.shape)}; "
                            f"match model.hidden/model.channels to the saved model.")
    model.load_state_dict(state)
    return model


def set_training(model: nn.Module, mode: bool) -> None:
    """train()/eval(), skipped for graphs from torch.export (their mode is fixed)."""
    with contextlib.suppress(NotImplementedError, RuntimeError):
        model.train(mode)


def complexity(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Parameters (all, trainable, non-zero), FLOPs per sample, serialized size in bytes.

    FLOPs are counted by `torch.utils.flop_counter` at batch 1 (a multiply-add counts 2);
    activations and pooling are not counted, as is customary. The size is that of the
    state_dict as `torch.save` writes it; a run replaces it with its shipped file's size.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    set_training(model, False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *input_shape), device=device))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in params)),
        "flops": int(counter.get_total_flops()),
        "size_bytes": len(buffer.getvalue()),
    }


def onnx_complexity(path: str | Path) -> dict[str, Any]:
    """Parameters (initializer elements), operators and file size of an ONNX model."""
    path = Path(path)
    check_onnx(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise UserError(f"{path.name} is not a readable ONNX model; export it again with "
                        f"torch.onnx.export.") from None
    try:
        arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL]
    except Exception:  # a forged tensor (no type, short data) fails in many ways
        raise UserError(f"{path.name} holds a tensor that cannot be read; export the model "
                        f"again with torch.onnx.export.") from None
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"params": int(sum(a.size for a in arrays)),
            "nonzero_params": int(sum(int((a != 0).sum()) for a in arrays)),
            "size_bytes": path.stat().st_size, "operators": ops}


def read_onnx(path: str | Path) -> bytes:
    """An uploaded .onnx file as self-contained bytes for ONNX Runtime, after its checks;
    external data (only ever from the model's own folder) is folded in, since a session made
    from bytes would look for it relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist; check the path.")
    check_onnx(path)
    import onnxruntime as ort

    blob = path.read_bytes()
    proto = onnx.load_model_from_string(blob)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx_tensors(proto)):
        try:
            blob = onnx.load(str(path), load_external_data=True).SerializeToString()
        except Exception as exc:
            raise UserError(f"the external data of {path.name} could not be read "
                            f"({type(exc).__name__}); keep its data files next to it or save "
                            f"the model with its weights inside.") from None
    try:  # ONNX Runtime's own verdict, as one sentence rather than its exception
        ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path.name} is not a model ONNX Runtime can run ({reason}); export "
                        f"it again with torch.onnx.export.") from None
    return blob


def save_model(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> int:
    """Write the model as a torch.export archive with a dynamic batch axis; return its size."""
    set_training(model, False)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    example = (torch.zeros((2, *input_shape), device=device),)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return Path(path).stat().st_size


def layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, as `train.freeze` takes them."""
    names = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    return sorted(names)


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per leaf layer: name, type, output shape per sample, parameters."""
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
                rows.append({"layer": name, "type": type(mod).__name__,
                             "output": "x".join(map(str, shape)),
                             "params": sum(p.numel() for p in mod.parameters())})
            hooks.append(module.register_forward_hook(hook))
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    return rows


def describe(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> dict[str, Any]:
    """What the Model page shows: complexity figures and the layer table (ONNX: operators)."""
    if cfg.source.lower().endswith(".onnx"):
        return onnx_complexity(cfg.source)
    model = build_model(cfg, input_shape, n_out, seed=0)
    return {**complexity(model, input_shape), "layers": layer_table(model, input_shape)}


def own_outputs(cfg: ModelConfig, input_shape: tuple[int, ...], *,
                pretrained: bool = True) -> tuple[int, list[str] | None]:
    """A pretrained model's own output width and class names, for label-free runs (its
    predictions become the labels): a Hugging Face folder's labels, a bundle's outputs, an
    uploaded graph's probed width. A model with random weights has nothing to agree with."""
    source = cfg.source
    if not pretrained and source.lower().endswith(".onnx"):  # its declared output width
        width = onnx_output_width(source)
        if width is not None:
            return width, None
    if not pretrained and source.startswith(("builtin:", "hfarch:")):
        raise UserError("data.label_space \"model\" keeps labels as indices into a model's "
                        "own outputs, and a built-in or random-init architecture has none of "
                        "its own; use data.label_space \"data\".")
    if source.startswith(("builtin:", "hfarch:")) or source.lower().endswith(".onnx"):
        kind = "an ONNX model" if source.lower().endswith(".onnx") else \
            "a model with random weights"
        raise UserError(f"data.labels \"teacher\" scores every variant by its agreement with "
                        f"the original model, and {kind} cannot be that teacher here; use a "
                        f"pretrained Hugging Face folder, a bundle or a .pt2, or labelled data.")
    if is_text_folder(source):
        return text_outputs(source)
    if is_hf_source(source):
        names = hf_class_names(source)
        return len(names), names
    if is_bundle(source):
        output = read_meta(source).get("output") or {}
        return int(output.get("n_out") or 0), output.get("classes")
    model = load_model(cfg, input_shape, 0)
    with torch.no_grad():
        out = model(torch.zeros((2, *input_shape)))
    return int(out.shape[1]) if out.ndim == 2 else 1, None


def onnx_output_width(path: str | Path) -> int | None:
    """The fixed width of an ONNX model's first output, if it declares one."""
    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value or None if len(dims) >= 2 else None

