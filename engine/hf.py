"""Hugging Face vision classifiers: a local folder (`hf:PATH`) or a named architecture
built from a config (`hfarch:NAME`, random init), never downloaded, never remote code.

A folder is config.json (+ model.safetensors, + preprocessor_config.json), loaded by
transformers offline (`local_files_only=True`, `trust_remote_code` off: a config whose
`auto_map` asks for remote code is refused). Any `AutoModelForImageClassification` works:
ResNet, MobileNetV2, EfficientNet, ConvNeXt, ViT, ... The model is wrapped so it takes a
batch of images and returns logits (`HFImageClassifier`); the folder's mean and std
normalize inside it, so they go with the model into the bundle and the ONNX file. A head
whose class count differs from the data's is replaced (transfer learning) and the model
says so in `workbench_notes`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from engine.architectures import weights_mismatch
from engine.errors import UserError
from engine.recipe import ModelConfig

# transformers resolves its classes lazily, importing a submodule on first use; two threads
# doing that at once (the app's warm-up and a page's script, or two sessions) can meet a
# half-imported module: "cannot import name 'AutoTokenizer' from 'transformers'", in CI once
# and then for the life of the server. Every use of transformers in the engine holds this.
_TRANSFORMERS = threading.RLock()
CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageClassification",
           "AutoModelForSequenceClassification", "AutoTokenizer")


@contextmanager
def transformers_held() -> Iterator[ModuleType]:
    """transformers, with its classes resolved, while no other thread touches it."""
    with _TRANSFORMERS:
        import transformers

        for name in CLASSES:
            getattr(transformers, name)
        yield transformers


# architectures offered with random weights: transformers config settings at small sizes
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "resnet-tiny": ("resnet", {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                               "depths": [1, 1, 1, 1], "layer_type": "basic"},
                    "ResNet with basic blocks, widths 16-128 (0.7 M weights)"),
    "resnet-18": ("resnet", {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512],
                             "depths": [2, 2, 2, 2], "layer_type": "basic"},
                  "ResNet-18: basic blocks, widths 64-512 (11 M weights)"),
    "mobilenet_v2": ("mobilenet_v2", {"depth_multiplier": 0.35},
                     "MobileNetV2 at width 0.35: inverted residuals, depthwise convolutions"),
    "efficientnet-tiny": ("efficientnet", {"width_coefficient": 0.25, "depth_coefficient": 0.25,
                                           "hidden_dim": 320},
                          "EfficientNet at width 0.25: MBConv with squeeze-excitation"),
    # transformers' EfficientNetConfig() is B7 (width 2.0, depth 3.1, 600 px, 66 M weights)
    "efficientnet-b0": ("efficientnet", {"width_coefficient": 1.0, "depth_coefficient": 1.0,
                                         "image_size": 224, "dropout_rate": 0.2,
                                         "hidden_dim": 1280},
                        "EfficientNet-B0 as published: 5.3 M weights, about 20 MB"),
    "convnext-tiny": ("convnext", {"hidden_sizes": [24, 48, 96, 192], "depths": [1, 1, 2, 1]},
                      "ConvNeXt, widths 24-192: depthwise 7x7, LayerNorm, GELU"),
    "vit-tiny": ("vit", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 128, "patch_size": 4},
                 "Vision Transformer: 2 layers of width 64, patches of 4 pixels"),
}


class HFImageClassifier(nn.Module):
    """A transformers image classifier as the engine runs every model: images in (batch,
    channels, height, width), logits out; its own normalization inside."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=(x - self.mean) / self.std).logits


def model_type_of(config: dict[str, Any]) -> str:
    return str(config.get("model_type", ""))


def is_hf_source(source: str) -> bool:
    return source.startswith(("hf:", "hfarch:"))


def folder_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; a Hugging Face folder needs its "
                        f"config.json (and model.safetensors for its weights).")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{folder}/config.json is not valid JSON; save the folder again with "
                        f"save_pretrained.") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{folder}/config.json names no model_type; save the folder again "
                        f"with save_pretrained.")
    if config.get("auto_map"):
        raise UserError(f"{folder} needs remote code (its config has an auto_map), which the "
                        f"workbench never runs; use a folder of a built-in transformers "
                        f"architecture.")
    return config


def hf_class_names(source: str) -> list[str]:
    """A Hugging Face folder's class names, in output order (id2label, else num_labels)."""
    config = folder_config(Path(source.removeprefix("hf:")))
    id2label = config.get("id2label") or {}
    if id2label:
        return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]
    return [str(i) for i in range(int(config.get("num_labels", 2)))]


def _normalization(folder: Path | None, channels: int) -> tuple[list[float], list[float]]:
    """The folder's preprocessor mean and std, else none (mean 0, std 1)."""
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        try:
            pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
            mean, std = pre.get("image_mean"), pre.get("image_std")
            if (isinstance(mean, list) and isinstance(std, list)
                    and len(mean) == len(std) == channels):
                return [float(v) for v in mean], [float(v) for v in std]
        except (OSError, ValueError):
            pass
    return [0.0] * channels, [1.0] * channels


def build_hf(builder: dict[str, Any]) -> nn.Module:
    """The architecture a bundle's "hf" builder describes, random weights."""
    settings = dict(builder["config"])
    model_type = settings.pop("model_type")
    try:
        with transformers_held() as hf:
            config = hf.AutoConfig.for_model(model_type, **settings)
            inner = hf.AutoModelForImageClassification.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"transformers cannot build a {model_type!r} image classifier from "
                        f"this config ({str(exc)[:120]}); use an image classification "
                        f"model's folder.") from None
    model = HFImageClassifier(inner, builder["mean"], builder["std"])
    model.workbench_builder = builder
    return model


def build_hf_source(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    """The model of an `hf:PATH` folder or an `hfarch:NAME` architecture, for images of
    `input_shape` and `n_out` classes (a head of another size is replaced)."""
    if len(input_shape) != 3:
        raise UserError(f"a Hugging Face vision model takes images; this data has samples of "
                        f"shape {input_shape}; pick an image dataset or a built-in model.")
    channels = input_shape[0]
    folder = None
    if cfg.source.startswith("hfarch:"):
        name = cfg.source.removeprefix("hfarch:")
        if name not in ARCHITECTURES:
            raise UserError(f"unknown architecture {name!r}; choose one of "
                            f"{', '.join(ARCHITECTURES)}.")
        model_type, settings, _ = ARCHITECTURES[name]
        config = {"model_type": model_type, **settings}
    else:
        folder = Path(cfg.source.removeprefix("hf:"))
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; hf:PATH takes a local Hugging Face "
                            f"folder (config.json, model.safetensors).")
        config = folder_config(folder)
    declared = config.get("num_channels", 3)
    if declared != channels and folder is not None and (folder / "model.safetensors").is_file():
        raise UserError(f"this model takes images with {declared} channel(s) and the data's "
                        f"have {channels}; pick data with {declared}-channel images.")
    mean, std = _normalization(folder, channels)
    labels_before = len(config.get("id2label") or {}) or config.get("num_labels")
    config = {k: v for k, v in config.items()
              if k not in ("id2label", "label2id", "architectures", "transformers_version",
                           "torch_dtype", "dtype")}
    config.update(num_channels=channels, num_labels=n_out)
    weights = folder is not None and (folder / "model.safetensors").is_file()
    if not weights and ("image_size" in config or model_type_of(config) == "vit"):
        config["image_size"] = input_shape[1]  # position embeddings sized for this data
    builder = {"kind": "hf", "config": config, "mean": mean, "std": std}
    model = build_hf(builder)
    notes = []
    if folder is not None and (folder / "model.safetensors").is_file():
        notes += _load_weights(model, folder / "model.safetensors", labels_before, n_out)
    elif folder is not None:
        notes.append(f"{folder.name} has no model.safetensors, so the model starts from "
                     f"random weights.")
    model.workbench_notes = notes
    return model


def _load_weights(model: HFImageClassifier, path: Path, labels_before: int | None,
                  n_out: int) -> list[str]:
    """The folder's weights into the inner model; the classifier head only when its size
    matches the data's classes (else it stays new, and a note says so)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path.name} is not a valid safetensors file ({str(exc)[:120]}); "
                        f"save the folder again with save_pretrained.") from None
    expected = model.model.state_dict()
    head = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or (head and labels_before in (None, n_out)):
        raise UserError(weights_mismatch(path.parent.name, expected, state, missing,
                                         unexpected, head))
    model.model.load_state_dict({k: v for k, v in state.items() if k not in head},
                                strict=False)
    if head:
        return [f"the folder's classifier head has {labels_before} classes and this data "
                f"has {n_out}, so the head ({', '.join(head)}) is new and trained from "
                f"random weights (transfer learning)."]
    return []


# width settings of transformers' vision configs: integer widths, and multipliers
WIDTHS = ("hidden_sizes", "embedding_size", "hidden_size", "intermediate_size",
          "neck_hidden_sizes", "hidden_dim")
MULTIPLIERS = ("depth_multiplier", "width_coefficient")


def scaled_builder(builder: dict[str, Any], multiplier: float) -> dict[str, Any]:
    """The same architecture at `multiplier` of its width (a distillation student): every
    width setting scaled (at least 1; a transformer's width stays a multiple of its heads),
    every width multiplier multiplied."""
    config = dict(builder["config"])
    heads = int(config.get("num_attention_heads", 1) or 1)

    def scale(width: int, key: str) -> int:
        step = heads if key == "hidden_size" else 1
        return max(step, round(width * multiplier / step) * step)

    changed = False
    for key in WIDTHS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key], changed = scale(value, key), True
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            config[key], changed = [scale(v, key) for v in value], True
    for key in MULTIPLIERS:
        if isinstance(config.get(key), int | float):
            config[key], changed = config[key] * multiplier, True
    if not changed:
        raise UserError(f"distill cannot find the width settings of this "
                        f"{config.get('model_type')} config to scale; set the step's student "
                        f"to a model section.")
    return {**builder, "config": config}

