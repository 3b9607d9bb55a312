"""The model bundle: what every variant is written as, and what `model.source` reloads.

A bundle is a folder, `DIR/<variant>/`, holding
- `model.json`: the *builder* (what makes the architecture: a built-in with its settings
  and the data's shapes, or a Hugging Face config), the *overrides* (every module whose
  type or shape differs from what the builder makes: a factorized layer, a pruned
  convolution, an inserted activation quantizer, written as a tree of allow-listed
  `torch.nn` modules), the input and output spec, the compression applied and the layer
  names;
- `model.safetensors`: the state_dict, read without unpickling anything, and beside it
  the fitted preprocessing's arrays (`preprocess.*`);
- `graph.pt2`, only for a model that came as an exported graph (`.pt2`, TorchScript): the
  graph is then its architecture (`engine.graphs`), checked like every upload on loading.

`load_bundle` builds the architecture, applies the overrides, then loads the weights
strictly, so it gives back the same `nn.Module` tree with the same layer names: a run's
model goes on to Compress or Deploy exactly as the in-memory one would. A model carries
its builder as the attribute `workbench_builder` (set by `engine.models.build_model`), so
every technique's copy keeps it.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.architectures import (
    MAX_PARAMS,
    Factorized,
    build_builtin,
    check_fits,
    weights_mismatch,
)
from engine.errors import UserError
from engine.graphs import load_program
from engine.hf import build_hf
from engine.hf_text import TOKENIZER_DIR, build_hf_text, copy_tokenizer
from engine.quantizers import FAKE_QUANT, QUANT_INPUT, ActivationFakeQuant
from engine.recipe import ModelConfig
from engine.uploads import check_model_file

FORMAT = "workbench-bundle"
VERSION = 1
CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "bias", "padding_mode")
NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
# the modules an override may hold, with the constructor arguments read back from them
MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv1d": (nn.Conv1d, CONV_ARGS), "Conv2d": (nn.Conv2d, CONV_ARGS),
    "BatchNorm1d": (nn.BatchNorm1d, NORM_ARGS), "BatchNorm2d": (nn.BatchNorm2d, NORM_ARGS),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
    "ReLU": (nn.ReLU, ()), "ReLU6": (nn.ReLU6, ()), "Tanh": (nn.Tanh, ()),
    "GELU": (nn.GELU, ("approximate",)), "Sigmoid": (nn.Sigmoid, ()), "SiLU": (nn.SiLU, ()),
    "Hardswish": (nn.Hardswish, ()), "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Identity": (nn.Identity, ()), "Dropout": (nn.Dropout, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Unflatten": (nn.Unflatten, ("dim", "unflattened_size")),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size", "stride", "padding")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "ZeroPad2d": (nn.ZeroPad2d, ("padding",)),
    "ActivationFakeQuant": (ActivationFakeQuant, ("bits", "momentum")),
    "Sequential": (nn.Sequential, ()), "Factorized": (Factorized, ()),
    **{cls.__name__: (cls, (CONV_ARGS if "Conv" in cls.__name__ else
                            ("in_features", "out_features", "bias")))
       for cls in [*FAKE_QUANT.values(), *QUANT_INPUT.values()]},
}
EXTRA = {"ActivationFakeQuant": ("frozen",), **{cls.__name__: ("qat_bits", "qat_scheme",
                                                               "qat_per_channel")
                                                for cls in FAKE_QUANT.values()}}
EXTRA_PREFIX = "preprocess."  # arrays stored beside the weights, not loaded into the model


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle folder (model.json beside model.safetensors)."""
    p = Path(path)
    return (p / "model.json").is_file() and (p / "model.safetensors").is_file()


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """The JSON spec of an allow-listed module (a Sequential with its children), else None."""
    kind = type(module).__name__
    if kind not in MODULES or type(module) is not MODULES[kind][0]:
        return None
    args = {}
    for arg in MODULES[kind][1]:
        value = getattr(module, arg, None)
        if arg == "bias":
            value = module.bias is not None
        elif arg == "bits":
            value = round(math.log2(module.levels + 1))
        args[arg] = list(value) if isinstance(value, tuple) else value
    spec: dict[str, Any] = {"type": kind, "args": args}
    if kind in EXTRA:
        spec["attrs"] = {a: getattr(module, a) for a in EXTRA[kind]}
    if kind == "Factorized":
        spec["args"] = module.attrs()
    children = []
    for name, child in module.named_children():
        sub = module_spec(child)
        if sub is None:
            return None
        children.append({"name": name, **sub})
    if children or kind in ("Sequential", "Factorized"):
        spec["children"] = children
    return spec


def build_spec(spec: dict[str, Any]) -> nn.Module:
    """The module a spec describes (random weights: the state_dict fills them in)."""
    if spec.get("type") not in MODULES:
        raise UserError(f"this bundle holds a module of type {spec.get('type')!r}, which "
                        f"the workbench does not build; write the model again with the "
                        f"workbench.")
    cls, names = MODULES[spec["type"]]
    if spec["type"] == "Sequential":
        module = nn.Sequential()
        for child in spec["children"]:
            module.add_module(child["name"], build_spec(child))
        return module
    if spec["type"] == "Factorized":
        first, second = (build_spec(child) for child in spec["children"])
        return Factorized(first, second, **spec["args"])
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["args"].items()
            if k in names}
    module = cls(**args)
    for key, value in spec.get("attrs", {}).items():
        setattr(module, key, value)
    for child in spec.get("children", []):  # a QuantInput layer's input quantizer
        module.add_module(child["name"], build_spec(child))
    return module


def overrides(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """Every module of `model` whose type, shape or children differ from `base` (what the
    builder makes), outermost first: a changed module is written whole, its children not
    visited. A changed module outside the allow-list is a UserError naming it."""
    found: list[dict[str, Any]] = []

    def walk(mod: nn.Module, ref: nn.Module | None, path: str) -> None:
        spec = module_spec(mod)
        same = (ref is not None and type(mod) is type(ref)
                and list(mod._modules) == list(ref._modules)
                and (spec is None or _own(spec) == _own(module_spec(ref))))
        if same and spec is None and ref is not None:  # a layer of the architecture's own
            resized = _resized(mod, ref)  # type, made thinner in place (Torch-Pruning)
            if resized:
                found.append({"path": path, **resized})
        if not same:
            if spec is None:
                raise UserError(f"layer {path or '(the model)'} is a {type(mod).__name__} "
                                f"that differs from the architecture it was built from, "
                                f"and a bundle cannot describe it; it cannot be saved.")
            found.append({"path": path, "module": spec})
            return
        for name, child in mod.named_children():
            walk(child, ref.get_submodule(name), f"{path}.{name}" if path else name)

    walk(model, base, "")
    return found


def _simple(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, int | float | bool | str) for v in value)
    return isinstance(value, int | float | bool | str)


def _resized(mod: nn.Module, ref: nn.Module) -> dict[str, Any]:
    """What differs between a module and the builder's one of the same type: the shapes of
    its own parameters and buffers, and its simple size attributes (normalized_shape,
    out_channels, ...)."""
    own = {**dict(mod.named_parameters(recurse=False)), **dict(mod.named_buffers(recurse=False))}
    theirs = {**dict(ref.named_parameters(recurse=False)),
              **dict(ref.named_buffers(recurse=False))}
    shapes = {k: list(t.shape) for k, t in own.items()
              if k in theirs and t.shape != theirs[k].shape}
    attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(mod).items()
             if not k.startswith("_") and k != "training" and _simple(v)
             and k in vars(ref) and vars(ref)[k] != v}
    return {"resize": shapes, "attrs": attrs} if shapes or attrs else {}


def _apply_resize(model: nn.Module, item: dict[str, Any]) -> None:
    """Give a module the shapes and size attributes a bundle recorded for it."""
    mod = model.get_submodule(item["path"]) if item["path"] else model
    for name, shape in item.get("resize", {}).items():
        if name in mod._parameters:
            old = mod._parameters[name]
            mod._parameters[name] = nn.Parameter(torch.empty(shape, dtype=old.dtype),
                                                 requires_grad=old.requires_grad)
        elif name in mod._buffers:
            mod._buffers[name] = torch.empty(shape, dtype=mod._buffers[name].dtype)
    for key, value in item.get("attrs", {}).items():
        old = getattr(mod, key, None)
        setattr(mod, key, tuple(value) if isinstance(old, tuple) else value)


def _own(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A spec without its children: what a module is by itself."""
    return None if spec is None else {k: v for k, v in spec.items() if k != "children"}


def _set(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    return model


def build_base(builder: dict[str, Any], graph: bytes | None = None) -> nn.Module:
    """The architecture a builder describes, with random weights (an exported graph's: the
    weights it was exported with, `graph` being its `.pt2` bytes)."""
    kind = builder.get("kind")
    if kind == "pt2":
        if graph is None:
            raise UserError("this bundle's graph.pt2 is missing; write the model again.")
        return load_program(graph)
    if kind == "builtin":
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in builder["model"].items()})
        return build_builtin(cfg, builder["name"], tuple(builder["input_shape"]),
                             int(builder["n_out"]))
    if kind == "hf":
        return build_hf(builder)
    if kind == "hf_text":
        return build_hf_text(builder)
    raise UserError(f"this bundle's model.json names a builder {kind!r} the workbench does "
                    f"not know; write the model again with the workbench.")


def save_bundle(model: nn.Module, folder: str | Path, *, input_spec: dict[str, Any],
                output_spec: dict[str, Any], compression: list[Any] | None = None,
                extra: dict[str, Any] | None = None) -> int:
    """Write `model` as a bundle in `folder`; return the bundle's size in bytes (both
    files). The model must carry `workbench_builder`. `extra` arrays (the fitted
    preprocessing, `preprocess.*`) are stored beside the weights and are not loaded into
    the model."""
    builder = getattr(model, "workbench_builder", None)
    if builder is None:
        raise UserError(f"this {type(model).__name__} was not built by the workbench (no "
                        f"builder), so it cannot be written as a bundle.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph = getattr(model, "workbench_graph", None)
    if builder["kind"] == "pt2":  # the exported graph is the architecture
        (folder / "graph.pt2").write_bytes(graph)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    layers = layer_summary(state)
    for key, value in (extra or {}).items():
        state[key] = torch.as_tensor(value).contiguous().clone()
    if builder["kind"] == "hf_text":  # the tokenizer rides along (not counted as the model)
        copy_tokenizer(builder["tokenizer"], folder / TOKENIZER_DIR)
        builder = {**builder, "tokenizer": TOKENIZER_DIR}
    meta = {"format": FORMAT, "version": VERSION, "builder": builder,
            "overrides": overrides(model, build_base(builder, graph)), "input": input_spec,
            "output": output_spec, "compression": compression or [],
            "layers": layers}
    (folder / "model.json").write_text(json.dumps(meta, indent=1, default=str),
                                       encoding="utf-8")
    save_file(state, str(folder / "model.safetensors"))
    return sum((folder / f).stat().st_size for f in ("model.json", "model.safetensors",
                                                      "graph.pt2") if (folder / f).is_file())


def layer_summary(state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per weight tensor: shape, the fraction that is non-zero (pruning's masks) and, when
    few, the number of distinct values (sharing's codebooks, k-bit grids)."""
    rows = []
    for name, t in state.items():
        if not t.is_floating_point() or t.dim() < 2:
            continue
        distinct = int(torch.unique(t).numel()) if t.numel() <= 4_000_000 else None
        rows.append({"tensor": name, "shape": list(t.shape),
                     "nonzero_fraction": round(float((t != 0).float().mean()), 6),
                     "distinct_values": distinct if distinct is not None and distinct <= 65536
                     else None})
    return rows


def read_meta(folder: str | Path) -> dict[str, Any]:
    """model.json of a bundle, checked; a wrong file is one sentence."""
    path = Path(folder) / "model.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable bundle description ({type(exc).__name__});"
                        f" write the model again with the workbench.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a workbench model bundle (no \"format\": "
                        f"\"{FORMAT}\"); point model.source at a folder the workbench wrote.")
    return meta


def load_bundle(folder: str | Path, input_shape: tuple[int, ...] | None = None,
                n_out: int | None = None) -> nn.Module:
    """The model a bundle holds: the same module tree, layer names and weights. With
    `input_shape` and `n_out`, it is checked against the data it will run on."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{folder.name}/model.safetensors is not a valid safetensors file "
                        f"({str(exc)[:120]}); write the model again.") from None
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    total = sum(t.numel() for t in state.values())
    if total > MAX_PARAMS:
        raise UserError(f"this model has {total:,} weights, over the workbench's limit of "
                        f"{MAX_PARAMS:,} for one machine; use a smaller model.")
    graph = None
    if meta["builder"].get("kind") == "pt2":
        path = folder / "graph.pt2"
        if not path.is_file():
            raise UserError(f"{folder.name} has no graph.pt2, which its model.json needs; "
                            f"write the model again with the workbench.")
        check_model_file(path)  # an uploaded bundle's graph passes the pickle checks too
        graph = path.read_bytes()
    if meta["builder"].get("kind") == "hf_text":
        meta["builder"]["tokenizer"] = str(folder / TOKENIZER_DIR)
    model = build_base(meta["builder"], graph)
    builder = model.workbench_builder
    for item in meta.get("overrides", []):
        if "module" in item:
            model = _set(model, item["path"], build_spec(item["module"]))
        else:
            _apply_resize(model, item)
    model.workbench_builder = builder
    if graph is not None:
        model.workbench_graph = graph
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UserError(weights_mismatch(folder.name, expected, state, missing, unexpected,
                                         wrong))
    model.load_state_dict(state)
    model.eval()
    if input_shape is not None and n_out is not None:
        check_fits(model, input_shape, n_out)
    return model


def zipped(folder: str | Path) -> bytes:
    """A bundle folder (and the exports beside it) as ZIP bytes, to download or upload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                zf.write(path, path.name)
    return buffer.getvalue()
