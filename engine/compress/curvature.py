"""Diagonal curvature of the training loss, for Optimal Brain Damage's saliency 0.5·h·w²:
the true Fisher (squared per-example gradients at labels drawn from the model itself) or a
Hutchinson estimate of the Hessian's diagonal, on at most CURVATURE_EXAMPLES training rows,
within a stated memory budget."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.compress.base import CompressContext
from engine.metrics import loss_fn, rows_per_batch
from engine.models import set_training

CURVATURE_EXAMPLES = 1024  # training examples the curvature is estimated on (cost, not accuracy)
HUTCHINSON_SAMPLES = 8  # Rademacher probes, one Hessian-vector product each
CURVATURE_BATCH = 64  # examples per double-backward pass of the Hessian estimate
CURVATURE_MEMORY = 512 * 2**20  # bytes the Fisher's per-example gradients may take at once
LOOP_BELOW = 128  # where an evaluation batch holds fewer rows than this (large samples), the
#   Fisher takes one plain backward pass per example instead of torch.func's vmap: on
#   EfficientNet-Lite0 at 224 px vmap peaked at 6 GB even one photo at a time and took 0.29 s
#   a photo; the loop kept the model's own 1 GB and took 0.036 s


def curvature(model: nn.Module, named: list[tuple[str, nn.Parameter]], kind: str,
              ctx: CompressContext) -> list[torch.Tensor]:
    """Diagonal curvature of the training loss for each weight tensor in `named`."""
    X, y = ctx.tensors["X_train"], ctx.tensors["y_train"]
    gen = torch.Generator().manual_seed(ctx.seed)
    pick = torch.randperm(len(X), generator=gen)[:CURVATURE_EXAMPLES].to(X.device)
    X, y = X[pick], y[pick]
    criterion = loss_fn(ctx.task)
    names, params = [n for n, _ in named], [p for _, p in named]
    set_training(model, False)  # dropout off: the curvature of the model as it will be used
    if kind == "fisher":  # mean of squared per-example gradients, vectorized by torch.func

        def loss_one(ws: tuple[torch.Tensor, ...], x: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
            return criterion(functional_call(model, dict(zip(names, ws, strict=True)),
                                             (x[None],)), t[None])

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
        fisher = [torch.zeros_like(p) for p in params]
        # a chunk's per-example gradients cost chunk x weights floats: kept under the budget
        # and its activations like an evaluation batch's (13 photos of 224x224, not 128)
        fits = rows_per_batch(X.shape[1:])
        chunk = max(1, min(128, fits, CURVATURE_MEMORY // (4 * sum(p.numel() for p in params))))
        one_by_one = fits < LOOP_BELOW
        for t, weight in fisher_labels(model, X, y, ctx.task, gen):
            if one_by_one:  # large samples: plain backward passes, one example each
                for i in range(len(X)):
                    with sdpa_kernel(SDPBackend.MATH):
                        grads = torch.autograd.grad(criterion(model(X[i:i + 1]),
                                                              t[i:i + 1]), params)
                    for f, g in zip(fisher, grads, strict=True):
                        f += weight[i] * g ** 2
                continue
            for i in range(0, len(X), chunk):
                with sdpa_kernel(SDPBackend.MATH):
                    grads = per_example(tuple(p.detach() for p in params), X[i:i + chunk],
                                        t[i:i + chunk])
                w = weight[i:i + chunk]
                for f, g in zip(fisher, grads, strict=True):
                    f += (w.view(-1, *[1] * (g.ndim - 1)) * g ** 2).sum(0)
        return [f / len(X) for f in fisher]
    # Hutchinson: E[v ⊙ Hv] = diag(H) for Rademacher v, over batches of CURVATURE_BATCH
    # (the double backward keeps two sets of activations: one batch's, not all 1,024's);
    # attention through the math kernel, the one with second derivatives
    diag = [torch.zeros_like(p) for p in params]
    size = max(1, min(CURVATURE_BATCH, rows_per_batch(X.shape[1:]) // 2))  # large samples
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(0, len(X), size):
            xb, yb = X[i:i + size], y[i:i + size]
            share = len(xb) / len(X)
            grads = torch.autograd.grad(criterion(model(xb), yb), params, create_graph=True)
            for _ in range(HUTCHINSON_SAMPLES):
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p)
                      for p in params]
                hvs = torch.autograd.grad(grads, params, vs, retain_graph=True)
                for d, v, hv in zip(diag, vs, hvs, strict=True):
                    d += share * v * hv
            del grads
    # for ReLU nets the true diagonal is >= 0 (only the Gauss-Newton term survives), so a
    # negative estimate is probe noise; its size still says how sharply the loss bends
    return [(d / HUTCHINSON_SAMPLES).abs() for d in diag]


def fisher_labels(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: str,
                   gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(labels, weight per example) pairs whose weighted squared gradients make the Fisher.

    For classes, the true Fisher, estimated with one label per example drawn from the
    model's own predictions (summing over all classes was 10x the cost on digits). The
    empirical Fisher (the true labels) vanishes on examples the trained model already gets
    confidently right, so it called the weights serving them unimportant."""
    ones = torch.ones(len(X), device=X.device)
    if task != "classification":
        return [(y, ones)]
    with torch.no_grad():
        batch = rows_per_batch(X.shape[1:])  # not all 1,024 photos through at once
        probs = torch.cat([torch.softmax(model(X[i:i + batch]).float(), 1)
                           for i in range(0, len(X), batch)])
    drawn = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(X.device)
    return [(drawn, ones)]
