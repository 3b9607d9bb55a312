"""Built-in architectures, uploaded models, and the complexity figures of any model.

Built-ins are sized from the data: the input shape and the number of outputs come from the
dataset, the widths from the recipe. Uploads are loaded without unpickling arbitrary
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
import math
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch._export.converter import TS2EPConverter
from torch.utils.flop_counter import FlopCounterMode

from engine.errors import UserError
from engine.recipe import ModelConfig
from engine.registry import Registry
from engine.uploads import check_model_file, check_onnx, onnx_tensors

MODELS = Registry("models", "model", "Built-in architectures, sized from the dataset.")

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
                "leaky_relu": nn.LeakyReLU}


def _dense_head(layers: OrderedDict[str, nn.Module], n_in: int, cfg: ModelConfig,
                n_out: int) -> None:
    """Hidden fully connected layers (fc1, act1, drop1, ...) then the output layer `out`."""
    for i, width in enumerate(cfg.hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(n_in, width)
        layers[f"act{i}"] = _ACTIVATIONS[cfg.activation]()
        if cfg.dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(cfg.dropout)
        n_in = width
    layers["out"] = nn.Linear(n_in, n_out)


@MODELS.register("logreg", "Logistic regression (linear regression for a regression task): "
                 "one linear layer on the flattened input, the convex baseline.",
                 uses=["dropout"])
def logreg(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    if cfg.dropout > 0:
        layers["drop0"] = nn.Dropout(cfg.dropout)
    layers["out"] = nn.Linear(math.prod(input_shape), n_out)
    return nn.Sequential(layers)


@MODELS.register("mlp", "Multi-layer perceptron: fully connected hidden layers with an "
                 "activation and optional dropout after each.",
                 uses=["hidden", "activation", "dropout"])
def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    _dense_head(layers, math.prod(input_shape), cfg, n_out)
    return nn.Sequential(layers)


@MODELS.register("cnn", "LeNet-style convolutional network: convolution, activation and "
                 "2x max-pooling blocks, then a fully connected head; 2-D convolutions for "
                 "images, 1-D for signals and table rows.",
                 uses=["channels", "kernel_size", "hidden", "activation", "dropout"])
def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if len(input_shape) == 1:  # a table row is a 1-channel signal
        layers["unflatten"] = nn.Unflatten(1, (1, input_shape[0]))
        input_shape = (1, input_shape[0])
    if len(input_shape) not in (2, 3):
        raise UserError(f"the cnn takes tables (features), signals (channels, length) or "
                        f"images (channels, height, width); this data has samples of shape "
                        f"{input_shape}; choose mlp instead.")
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(input_shape) == 2 else (nn.Conv2d,
                                                                           nn.MaxPool2d)
    channels, spatial = input_shape[0], list(input_shape[1:])
    for i, width in enumerate(cfg.channels, start=1):
        layers[f"conv{i}"] = conv(channels, width, cfg.kernel_size, padding=cfg.kernel_size // 2)
        layers[f"cact{i}"] = _ACTIVATIONS[cfg.activation]()
        # odd kernels keep the size; even ones grow it by one
        spatial = [s + 1 - cfg.kernel_size % 2 for s in spatial]
        if min(spatial) >= 2:  # pool while there is something left to pool
            layers[f"pool{i}"] = pool(2)
            spatial = [s // 2 for s in spatial]
        channels = width
    layers["flatten"] = nn.Flatten()
    _dense_head(layers, channels * math.prod(spatial), cfg, n_out)
    return nn.Sequential(layers)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int, *,
                seed: int) -> nn.Module:
    """A fresh built-in model, or the uploaded one, ready to train on this data."""
    torch.manual_seed(seed)  # the initialization is part of the recipe's determinism
    if cfg.source.startswith("builtin:"):
        model = MODELS.get(cfg.source.removeprefix("builtin:")).fn(cfg, input_shape, n_out)
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
            return torch.export.load(str(path)).module()
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
    return graph


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
    model = MODELS.get(cfg.architecture).fn(cfg, input_shape, n_out)
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


def check_fits(model: nn.Module, input_shape: tuple[int, ...], n_out: int) -> None:
    """Run one sample through the model; a mismatch names both shapes and the fix."""
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape)))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        takes = _declared_input(model)
        if takes is not None:
            raise UserError(f"the model takes samples of {takes} but this dataset's samples "
                            f"have shape {input_shape} ({reason}); pick a dataset that fits "
                            f"the model, or a model built for samples of shape "
                            f"{input_shape}.") from None
        raise UserError(f"the model does not accept this dataset's samples of shape "
                        f"{input_shape} ({reason}); choose a dataset that fits the model or "
                        f"a model built for this data.") from None
    got = tuple(out.shape[1:])
    if got not in ((n_out,),) and not (n_out == 1 and got == ()):
        raise UserError(f"the model gives outputs of shape {got} per sample but this dataset "
                        f"needs ({n_out},); change the model's output layer to {n_out} "
                        f"outputs or pick the matching dataset.")


def _declared_input(model: nn.Module) -> str | None:
    """What a model says it takes, for a mismatch message: the input placeholder of a
    torch.export graph, else the first linear or convolution layer; None when unknown."""
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = getattr(node.meta.get("val"), "shape", None)
                if shape is not None and len(shape) >= 1:
                    dims = tuple(int(d) if isinstance(d, int) else "any" for d in shape[1:])
                    return f"shape {dims}"
                break
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return f"{module.in_features} features"
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return f"shape ({module.in_channels}, ...), {module.in_channels} input channel(s)"
    return None


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
