"""The built-in architectures, sized from the data, and the check that a model fits it.

The input shape and the number of outputs come from the dataset, the widths from the
recipe. `check_fits` runs two zero samples through any model and says in one sentence
what does not match.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from engine.errors import UserError
from engine.recipe import ModelConfig
from engine.registry import Registry

MODELS = Registry("models", "model", "Built-in architectures, sized from the dataset.")

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
                "leaky_relu": nn.LeakyReLU}
MAX_PARAMS = 500_000_000  # a stated limit: a bigger model does not fit this machine class


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


def check_fits(model: nn.Module, input_shape: tuple[int, ...], n_out: int) -> None:
    """Run one sample through the model; a mismatch names both shapes and the fix."""
    was_training = model.training
    try:  # in eval mode: a probe must not move a BatchNorm's running statistics
        with contextlib.suppress(NotImplementedError, RuntimeError):
            model.train(False)
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
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            model.train(was_training)
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


ARCHITECTURE_FIELDS = ("hidden", "activation", "dropout", "channels", "kernel_size")


def builtin_builder(cfg: ModelConfig, name: str, input_shape: tuple[int, ...],
                    n_out: int) -> dict[str, Any]:
    """What a bundle records to build this built-in again: its name, the settings that
    shape it and the data's shapes."""
    return {"kind": "builtin", "name": name,
            "model": {f: list(v) if isinstance(v := getattr(cfg, f), tuple) else v
                      for f in ARCHITECTURE_FIELDS},
            "input_shape": list(input_shape), "n_out": int(n_out)}


def build_builtin(cfg: ModelConfig, name: str, input_shape: tuple[int, ...],
                  n_out: int) -> nn.Module:
    """A built-in architecture with random weights, carrying its builder (a bundle's)."""
    model = MODELS.get(name).fn(cfg, input_shape, n_out)
    model.workbench_builder = builtin_builder(cfg, name, input_shape, n_out)
    return model


def weights_mismatch(name: str, expected: dict[str, torch.Tensor],
                     state: dict[str, torch.Tensor], missing: list[str],
                     unexpected: list[str], wrong: list[str]) -> str:
    """One sentence naming the first missing, unexpected and mis-shaped keys, with shapes."""
    parts = []
    if missing:
        parts.append(f"missing {missing[0]} {list(expected[missing[0]].shape)}"
                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        parts.append(f"unexpected {unexpected[0]} {list(state[unexpected[0]].shape)}"
                     + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    if wrong:
        k = wrong[0]
        parts.append(f"{k} is {list(state[k].shape)} where the architecture has "
                     f"{list(expected[k].shape)}")
    return (f"the weights in {name} do not match the architecture: {'; '.join(parts)}; "
            f"check that the weights belong to this model and its settings.")


# what a factorized pair keeps of the layer it replaces, for code that reads them (a padding
# computed from the convolution's stride, as in transformers' MobileNetV2)
LAYER_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size",
               "stride", "padding", "dilation", "groups", "padding_mode")


class Factorized(nn.Sequential):
    """Two thinner layers standing in for one (low-rank factorization), children `0` then
    `1`. It keeps the replaced layer's attributes, and `weight` is the product of its
    factors, so code that reads its layer's stride or weight dtype (transformers' ViT and
    MobileNetV2 do) runs unchanged."""

    def __init__(self, first: nn.Module, second: nn.Module, **attrs: Any) -> None:
        super().__init__(first, second)
        for key, value in attrs.items():
            if key in LAYER_ATTRS:
                setattr(self, key, tuple(value) if isinstance(value, list) else value)

    @property
    def weight(self) -> torch.Tensor:
        first, second = self._modules["0"].weight, self._modules["1"].weight
        product = second.flatten(1) @ first.flatten(1)
        return product.reshape(second.shape[0], *first.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self._modules["1"].bias

    def attrs(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k in LAYER_ATTRS
                if (v := self.__dict__.get(k)) is not None}
