"""Scoring: the task's loss and its score (accuracy or R²), in one place for every caller.

`evaluate` scores a model on tensors already on its device (training, compression, the
runner); `predict` and `score` work on NumPy arrays (diagnostics, deployment checks);
`score_outputs` scores outputs someone else computed (ONNX Runtime's, a bootstrap round's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.errors import UserError
from engine.models import set_training


def metric_name(task: str) -> str:
    """The score's name in histories and metrics: "accuracy" or "r2"."""
    return "accuracy" if task == "classification" else "r2"


def loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on logits for classes, mean squared error for regression."""
    if task == "classification":
        return nn.functional.cross_entropy
    return lambda out, y: nn.functional.mse_loss(out.reshape(y.shape), y)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """The coefficient of determination; 0 for a constant target (nothing to explain)."""
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0


def score_outputs(out: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy of class logits `out` (n, K), or R² of predictions `out` (n,) or (n, 1)."""
    out = np.asarray(out)
    if task == "classification":
        return float((out.argmax(1) == y).mean())
    return r2(y, out.reshape(y.shape))


EVAL_INPUT_FLOATS = 2**21  # input values per evaluation batch: 8,192 table rows, but 14
#                           images of 224x224x3 (a whole split of photos at once held
#                           gigabytes of activations)


def rows_per_batch(sample_shape: tuple[int, ...] | torch.Size) -> int:
    """Rows an evaluation batch takes: 8,192, fewer for large samples."""
    return max(1, min(8192, EVAL_INPUT_FLOATS // max(1, math.prod(sample_shape))))


@torch.no_grad()
def outputs(model: nn.Module, X: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """The model's raw outputs on the rows of `X` (on its device), in evaluation batches of
    at most 8,192 rows and EVAL_INPUT_FLOATS input values."""
    batch = batch or rows_per_batch(X.shape[1:])
    set_training(model, False)
    return torch.cat([model(X[i:i + batch]).float() for i in range(0, len(X), batch)])


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: str,
             batch: int | None = None) -> dict[str, float]:
    """Loss and accuracy (classification) or MSE and R² (regression) on one split, in
    batches of at most 8,192 rows and EVAL_INPUT_FLOATS input values."""
    if len(X) == 0:
        return {}
    return scores_of(outputs(model, X, batch), y, task)


def scores_of(outs: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """`evaluate`'s figures from outputs already computed."""
    loss = float(loss_fn(task)(outs, y))
    if task == "classification":
        return {"loss": loss, "accuracy": float((outs.argmax(1) == y).float().mean())}
    pred = outs.reshape(y.shape)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out = {"loss": loss, "mse": loss, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 0.0}
    if y.ndim == 2:  # vectors (a teacher's outputs): how closely each row follows
        out["cosine"] = cosine(pred, y)
    return out


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Raw outputs (class logits, or predictions of shape (n,) for regression), in the
    batches `evaluate` uses."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    batch = rows_per_batch(X.shape[1:])
    parts = [model(torch.as_tensor(X[i:i + batch], dtype=torch.float32, device=device)
                   ).float().cpu().numpy() for i in range(0, len(X), batch)]
    out = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    return out.reshape(len(X)) if out.ndim == 2 and out.shape[1] == 1 else out


def score(model: nn.Module, X: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy (classification) or R² (regression): the score every curve plots."""
    return score_outputs(predict(model, X), y, task)


SCORE_KEYS = ("test_agreement", "test_accuracy", "test_r2")  # in the order they are preferred


def score_key(metrics: dict) -> str | None:
    """The headline score of a variant's metrics: its agreement with the original model
    (label-free runs), else accuracy, else R²."""
    return next((k for k in SCORE_KEYS if metrics.get(k) is not None), None)


@torch.no_grad()
def relabel(data: DataBundle, teacher: nn.Module, class_names: list[str] | None = None, *,
            outputs: bool = False) -> DataBundle:
    """The data labelled by `teacher` (label-free evaluation): by its top-1 predictions, so
    that a variant's accuracy is its agreement with the original model; with `outputs`
    (a model whose outputs are not classes: an embedder, a regressor) by its output vectors
    themselves, a regression whose `cosine` is the agreement."""
    set_training(teacher, False)
    device = next(iter(teacher.parameters()), torch.zeros(())).device
    batch = rows_per_batch(data.X_train.shape[1:])

    def run(X: np.ndarray) -> torch.Tensor:
        outs = [teacher(torch.as_tensor(X[i:i + batch], device=device)).float().cpu()
                for i in range(0, len(X), batch)]
        return torch.cat(outs).flatten(1) if outs else torch.zeros(0, width)

    width = int(teacher(torch.as_tensor(data.X_train[:1], device=device)).flatten(1).shape[1])
    if outputs:
        parts = {f"y_{p}": run(getattr(data, f"X_{p}")).numpy() for p in ("train", "val", "test")}
        return dataclasses.replace(data, **parts, task="regression", n_classes=0,
                                   class_names=[], labels="teacher")
    names = class_names if class_names and len(class_names) == width else [
        str(i) for i in range(width)]
    parts = {f"y_{p}": run(getattr(data, f"X_{p}")).argmax(1).numpy().astype(np.int64)
             for p in ("train", "val", "test")}
    return dataclasses.replace(data, **parts, task="classification", n_classes=width,
                               class_names=names, labels="teacher")


RETRIEVAL_K = 10  # neighbours compared by retrieval agreement
RETRIEVAL_ROWS = 2000  # the rows searched (a square matrix of similarities: 16 MB)


def retrieval_agreement(pred: torch.Tensor, y: torch.Tensor, k: int = RETRIEVAL_K) -> float:
    """How much of each row's `k` nearest other rows (by cosine) under the original
    embeddings `y` are still its `k` nearest under `pred`: the mean share, 1.0 when a
    search over these rows would return the same neighbours (the first RETRIEVAL_ROWS)."""
    pred, y = pred[:RETRIEVAL_ROWS], y[:RETRIEVAL_ROWS]
    k = min(k, len(y) - 1)
    if k < 1:
        return 1.0

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = nn.functional.normalize(e.flatten(1).float(), dim=1, eps=1e-12)
        sims = e @ e.T
        sims.fill_diagonal_(-float("inf"))
        return sims.topk(k, dim=1).indices

    ours, theirs = neighbours(pred), neighbours(y)
    same = (ours.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).float()
    return float(same.mean())


def cosine(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows: how closely outputs follow the original's."""
    return float(nn.functional.cosine_similarity(pred.flatten(1), y.flatten(1), dim=1,
                                                 eps=1e-12).mean())


def in_model_space(data: DataBundle, width: int, names: list[str] | None) -> DataBundle:
    """The data with its integer labels as indices into a model's `width` outputs (no
    renumbering); a label past the last output is one sentence."""
    top = max((int(y.max()) for y in (data.y_train, data.y_val, data.y_test) if len(y)),
              default=0)
    if top >= width:
        raise UserError(f"the labels go up to {top} but the model has {width} outputs; with "
                        f"data.label_space \"model\" each label must index one of them (0 to "
                        f"{width - 1}).")
    names = names if names and len(names) == width else [str(i) for i in range(width)]
    return dataclasses.replace(data, task="classification", n_classes=width,
                               class_names=names)

