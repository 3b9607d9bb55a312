"""Scoring: the task's loss and its score (accuracy or R²), in one place for every caller.

`evaluate` scores a model on tensors already on its device (training, compression, the
runner); `predict` and `score` work on NumPy arrays (diagnostics, deployment checks);
`score_outputs` scores outputs someone else computed (ONNX Runtime's, a bootstrap round's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

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
    return r2(y, out.reshape(len(y)))


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: str,
             batch: int = 8192) -> dict[str, float]:
    """Loss and accuracy (classification) or MSE and R² (regression) on one split."""
    if len(X) == 0:
        return {}
    set_training(model, False)
    outs = torch.cat([model(X[i:i + batch]).float() for i in range(0, len(X), batch)])
    loss = float(loss_fn(task)(outs, y))
    if task == "classification":
        return {"loss": loss, "accuracy": float((outs.argmax(1) == y).float().mean())}
    pred = outs.reshape(y.shape)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"loss": loss, "mse": loss, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 0.0}


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Raw outputs (class logits, or predictions of shape (n,) for regression)."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    out = model(torch.as_tensor(X, dtype=torch.float32, device=device)).float().cpu().numpy()
    return out.reshape(len(X)) if out.ndim == 2 and out.shape[1] == 1 else out


def score(model: nn.Module, X: np.ndarray, y: np.ndarray, task: str) -> float:
    """Accuracy (classification) or R² (regression): the score every curve plots."""
    return score_outputs(predict(model, X), y, task)
