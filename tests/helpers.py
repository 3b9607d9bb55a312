"""Shared by the compression and deployment tests: a trained model and its context."""

from __future__ import annotations

import torch
from torch import nn

from engine.compress import CompressContext
from engine.data import load_data
from engine.models import build_model
from engine.runner import resolve
from engine.train import to_tensors, train


def trained_context(raw: dict) -> tuple[nn.Module, CompressContext]:
    """Train the recipe's model on the CPU and return it with the context a compression
    step gets inside a run."""
    recipe = resolve(raw)
    data = load_data(recipe.data, seed=0)
    dev = torch.device("cpu")
    tensors = to_tensors(data, dev)
    n_out = data.n_classes if data.task == "classification" else 1
    model = build_model(recipe.model, data.input_shape, n_out, seed=0)
    train(model, data, recipe.train, device=dev, seed=0, tensors=tensors)
    ctx = CompressContext(tensors=tensors, task=data.task, input_shape=data.input_shape,
                          n_out=n_out, train_cfg=recipe.train, model_cfg=recipe.model,
                          data=data, device=dev, seed=0)
    return model, ctx
