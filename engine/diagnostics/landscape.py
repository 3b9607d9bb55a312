"""The loss landscape around a trained model along random filter-normalized directions.

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets": a raw random direction
means little, because a layer's scale can change without changing the function (ReLU
nets, batch norm). So each filter of the direction (an output row of a linear layer, an
output channel of a convolution) is rescaled to the norm of the same filter of the
weights, and biases and other 1-D parameters are left still (direction 0), as the paper
does. Loss is then comparable across models: a flat minimum rises slowly, a sharp one fast.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.errors import UserError
from engine.metrics import loss_fn
from engine.models import set_training

PARTS = ("train", "val", "test")


def filter_normalized(params: list[torch.Tensor], generator: torch.Generator
                      ) -> list[torch.Tensor]:
    """One Gaussian direction per parameter, each filter scaled to the weight filter's norm."""
    out = []
    for w in params:
        if w.ndim < 2:
            out.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        rows_d, rows_w = d.reshape(len(d), -1), w.reshape(len(w), -1)
        scale = rows_w.norm(dim=1) / rows_d.norm(dim=1).clamp_min(1e-12)
        out.append((rows_d * scale[:, None]).reshape(w.shape))  # a zero filter stays still
    return out


def loss_landscape(model: nn.Module, data: DataBundle, *, points: int = 21, span: float = 1.0,
                   two_d: bool = False, seed: int = 0, part: str = "train",
                   max_rows: int = 2048) -> dict[str, Any]:
    """The task loss at w + a*d (1-D) or w + a*d1 + b*d2 (2-D), a and b in [-span, span].

    The loss is the training loss function (cross-entropy or MSE, no penalties), averaged
    over up to `max_rows` rows of `part` drawn with `seed`. The model is never changed:
    the points are evaluated on a deep copy in evaluation mode. `sharpness` is the mean
    loss at ±span/2 along each direction minus the loss at the center. The 2-D `loss[i][j]`
    is at alphas[i], betas[j]."""
    if part not in PARTS:
        raise UserError(f"loss_landscape part must be one of {', '.join(PARTS)}, got {part!r}.")
    if points < 3 or not span > 0 or max_rows < 1:
        raise UserError(f"loss_landscape needs points >= 3, span > 0 and max_rows >= 1; got "
                        f"points={points}, span={span}, max_rows={max_rows}.")
    X_all, y_all = getattr(data, f"X_{part}"), getattr(data, f"y_{part}")
    if len(y_all) == 0:
        raise UserError(f"the {part} part is empty, so there is no loss to map; pick another "
                        f"part or give it rows.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(y_all), size=min(len(y_all), max_rows), replace=False))

    net = copy.deepcopy(model)
    set_training(net, False)
    params = [p for p in net.parameters()]
    device = params[0].device if params else torch.device("cpu")
    X = torch.as_tensor(X_all[rows], dtype=torch.float32, device=device)
    ydtype = torch.long if data.task == "classification" else torch.float32
    y = torch.as_tensor(y_all[rows], dtype=ydtype, device=device)
    criterion = loss_fn(data.task)
    center = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    d1 = filter_normalized(center, gen)
    d2 = filter_normalized(center, gen) if two_d else [torch.zeros_like(w) for w in center]

    @torch.no_grad()
    def loss_at(a: float, b: float = 0.0) -> float:
        for p, w, u, v in zip(params, center, d1, d2, strict=True):
            p.copy_(w + a * u + b * v)
        return float(criterion(net(X).float(), y))

    alphas = np.linspace(-span, span, points).tolist()
    center_loss = loss_at(0.0)
    half = span / 2
    around = [loss_at(-half), loss_at(half)]
    if two_d:
        around += [loss_at(0.0, -half), loss_at(0.0, half)]
    result: dict[str, Any] = {"alphas": alphas, "center_loss": center_loss,
                              "sharpness": float(np.mean(around)) - center_loss,
                              "span": span, "part": part, "rows": len(rows), "two_d": two_d}
    if two_d:
        result["betas"] = list(alphas)
        result["loss"] = [[loss_at(a, b) for b in alphas] for a in alphas]
    else:
        result["loss"] = [loss_at(a) for a in alphas]
    return result
