"""Training one stack of members: the loop of `engine.train`, on stacked tensors.

Each member draws its own batch order from its seed, follows its own schedule, stops early
on its own validation rows and ends with its own best weights; the arithmetic of every
step runs once for all of them (`engine.stack`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from engine.data import DataBundle
from engine.errors import UserError
from engine.metrics import metric_name
from engine.models import build_model, set_training
from engine.recipe import Recipe, TrainConfig
from engine.regularization import EarlyStopping
from engine.schedules import LRSchedule
from engine.stack import Member, Stack, StackedOptimizer
from engine.train import TrainResult, to_tensors, uses_bf16


def train_stacked(recipe: Recipe, data: DataBundle, members: Sequence[Member],
                  cfgs: Sequence[TrainConfig], *, device: torch.device,
                  tensors: dict[str, torch.Tensor] | None = None
                  ) -> list[tuple[nn.Module, TrainResult]]:
    """Train the members (one architecture, `cfgs` differing only in `PER_MEMBER` keys)
    as one stack; returns each member's model and result, as `engine.train` would."""
    start = time.perf_counter()
    t = tensors or to_tensors(data, device)
    X, y = t["X_train"], t["y_train"]
    K, cfg = len(members), cfgs[0]
    nets = [build_model(recipe.model, data.input_shape, data.n_outputs, seed=m.seed)
            for m in members]
    stack = Stack(nets, device)
    opt = StackedOptimizer(cfg.optimizer, stack.params, stack.is_weight, cfg)
    rows = [torch.arange(len(X), device=device) if m.idx is None else
            torch.as_tensor(np.asarray(m.idx), dtype=torch.long, device=device)
            for m in members]
    sizes = [len(r) for r in rows]
    even = len(set(sizes)) == 1
    full = cfg.batch_size == "full"
    batch = max(sizes) if full else min(int(cfg.batch_size), min(sizes))
    vrows = [None if m.val_idx is None else
             torch.as_tensor(np.asarray(m.val_idx), dtype=torch.long, device=device)
             for m in members]
    own_val = vrows[0] is not None
    if any((v is None) == own_val for v in vrows):
        raise ValueError("give every member of a stack its own validation rows, or none")
    has_val = own_val or len(t["X_val"]) > 0
    if cfg.early_stopping is not None and not has_val:
        raise UserError("early stopping needs a validation part; set data.val_fraction above "
                        "0 or train.early_stopping to null.")
    classify = data.task == "classification"
    metric = metric_name(data.task)
    epochs = [c.epochs for c in cfgs]
    schedules = [LRSchedule(c.schedule, c.lr, c.epochs) for c in cfgs]
    stoppers = [EarlyStopping(c.early_stopping.patience, c.early_stopping.min_delta,
                              c.early_stopping.restore_best)
                if c.early_stopping is not None else None for c in cfgs]
    best: list[torch.Tensor | None] = [None] * len(stack.params)
    best_epoch = [0] * K
    gens = [torch.Generator(device=device).manual_seed(m.seed) for m in members]
    torch.manual_seed(members[0].seed)  # dropout masks
    l1 = torch.tensor([c.l1 for c in cfgs], device=device)
    l2 = torch.tensor([c.l2 for c in cfgs], device=device)
    decay = torch.tensor([c.weight_decay for c in cfgs], device=device)
    penalized = bool((l1 > 0).any() or (l2 > 0).any())
    clip = cfg.grad_clip
    autocast = uses_bf16(cfg, device)
    histories = [{k: [] for k in ("epoch", "train_loss", f"train_{metric}", "val_loss",
                                  f"val_{metric}", "lr", "time_s")} for _ in range(K)]
    stopped, messages = ["completed"] * K, [""] * K
    active = [e > 0 for e in epochs]
    # padded full batches (members of different lengths): padded rows weigh nothing
    pad_rows, pad_w = None, None
    if full and not even:
        pad_rows = torch.stack([torch.cat([r, r[:1].expand(batch - len(r))]) for r in rows])
        pad_w = torch.stack([(torch.arange(batch, device=device) < len(r)).float()
                             for r in rows])
    cursors: list[tuple[torch.Tensor, int]] = [(r[torch.randperm(len(r), generator=g,
                                                                  device=device)], 0)
                                               for r, g in zip(rows, gens, strict=True)] \
        if not even and not full else []

    def member_losses(xb: torch.Tensor, yb: torch.Tensor, w: torch.Tensor | None,
                      training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if autocast:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = stack.forward(xb, training=training)
        else:
            out = stack.forward(xb, training=training)
        out = out.float()
        k, b = out.shape[0], out.shape[1]
        if classify:
            each = functional.cross_entropy(out.reshape(k * b, -1), yb.reshape(-1),
                                   reduction="none").view(k, b)
        else:
            each = (out.reshape(k, b) - yb) ** 2
        if w is None:
            return each.mean(1), out
        return (each * w).sum(1) / w.sum(1), out

    for epoch in range(max(epochs, default=0)):
        if not any(active):
            break
        live = torch.tensor(active, dtype=torch.float32, device=device)
        lrs = [s.lr(epoch) for s in schedules]
        lr = torch.tensor(lrs, device=device) * live
        loss_sum = torch.zeros(K, device=device)
        hits = torch.zeros(K, device=device)
        seen = 0
        if full:
            plan = [(pad_rows if pad_rows is not None else torch.stack(rows), pad_w)]
        elif even:
            n = sizes[0]
            order = torch.stack([r[torch.randperm(n, generator=g, device=device)]
                                 for r, g in zip(rows, gens, strict=True)]) \
                if batch < n else torch.stack(rows)
            plan = [(order[:, i:i + batch], None) for i in range(0, n, batch)]
        else:
            steps = math.ceil(sum(sizes) / K / batch)
            plan = [(_draw(cursors, batch, gens), None) for _ in range(steps)]
        for idx, w in plan:
            xb, yb = X[idx], y[idx]
            each, out = member_losses(xb, yb, w, True)
            total = each.sum()
            if penalized:
                weights = [p for p, iw in zip(stack.params, stack.is_weight, strict=True)
                           if iw]
                if bool((l1 > 0).any()):
                    total = total + (l1 * sum(p.abs().flatten(1).sum(1) for p in weights)).sum()
                if bool((l2 > 0).any()):
                    total = total + (0.5 * l2 * sum(p.pow(2).flatten(1).sum(1)
                                                    for p in weights)).sum()
            total.backward()
            if clip is not None:
                _clip(stack.params, clip)
            opt.step(lr, decay)
            b = idx.shape[1] if w is None else 1
            loss_sum += each.detach() * (b if w is None else w.sum(1))
            seen += b
            if classify:
                right = (out.detach().argmax(-1) == yb).float()
                hits += right.sum(1) if w is None else (right * w).sum(1)
        denom = torch.tensor(sizes, dtype=torch.float32, device=device) if full else \
            torch.full((K,), float(seen), device=device)
        train_loss = (loss_sum / denom).tolist()
        train_metric = (hits / denom).tolist() if classify else \
            _r2_rows(stack, X, y, rows, member_losses)
        if own_val:
            val_loss, val_metric = _val_rows(stack, X, y, vrows, classify, member_losses)
        elif has_val:
            val_loss, val_metric = _val(stack, t, classify, member_losses)
        else:
            val_loss, val_metric = [math.nan] * K, [math.nan] * K
        now = time.perf_counter() - start
        for k in range(K):
            if not active[k]:
                continue
            h = histories[k]
            if not math.isfinite(train_loss[k]):
                stopped[k], active[k] = "diverged", False
                messages[k] = (f"the training loss became {train_loss[k]} in epoch "
                               f"{epoch + 1}, so training stopped; the learning rate "
                               f"({lrs[k]:g}) is likely too high for {cfg.optimizer}: lower "
                               f"it ten-fold or set train.grad_clip.")
                continue
            for key, value in (("epoch", epoch + 1), ("train_loss", train_loss[k]),
                               (f"train_{metric}", train_metric[k]),
                               ("val_loss", val_loss[k]), (f"val_{metric}", val_metric[k]),
                               ("lr", lrs[k]), ("time_s", now)):
                h[key].append(value)
            if epoch + 1 >= epochs[k]:
                active[k] = False
            if has_val:
                schedules[k].observe(val_loss[k])
                st = stoppers[k]
                if st is not None:
                    was = st.best
                    stop = st.update(epoch + 1, val_loss[k], _NoState())
                    if st.best < was and st.restore_best:
                        _keep_best(best, stack.params, k)
                        best_epoch[k] = epoch + 1
                    if stop:  # as engine.train: even in the last epoch
                        stopped[k], active[k] = "early_stopping", False
    restored = [False] * K
    with torch.no_grad():
        for k in range(K):
            st = stoppers[k]
            if st is not None and st.restore_best and stopped[k] != "diverged" and \
                    best_epoch[k] > 0:
                for p, kept in zip(stack.params, best, strict=True):
                    if kept is not None:
                        p[k].copy_(kept[k])
                restored[k] = True
    stack.write_back()
    seconds = time.perf_counter() - start
    out = []
    for k, net in enumerate(nets):
        net.to(device)
        set_training(net, False)
        h = histories[k]
        last = h["epoch"][-1] if h["epoch"] else None
        fit = TrainResult(h, best_epoch[k] if restored[k] else last, stopped[k], messages[k],
                          seconds)
        fit.path = {"device": device.type, "precision": "bf16" if autocast else "fp32",
                    "compiled": False, "ensemble": "batched", "members": K}
        out.append((net, fit))
    return out


class _NoState(nn.Module):
    """EarlyStopping copies a state_dict on improvement; the stack keeps its own copy."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {}


def _keep_best(best: list[torch.Tensor | None], params: list[torch.Tensor], k: int) -> None:
    with torch.no_grad():
        for j, p in enumerate(params):
            if best[j] is None:
                best[j] = p.detach().clone()
            else:
                best[j][k].copy_(p[k])


def _draw(cursors: list[tuple[torch.Tensor, int]], batch: int,
          gens: list[torch.Generator]) -> torch.Tensor:
    """batch_size rows per member from its own running permutation, reshuffled at the end."""
    out = []
    for k, (perm, pos) in enumerate(cursors):
        if pos + batch > len(perm):
            perm = perm[torch.randperm(len(perm), generator=gens[k], device=perm.device)]
            pos = 0
        out.append(perm[pos:pos + batch])
        cursors[k] = (perm, pos + batch)
    return torch.stack(out)


def _clip(params: list[torch.Tensor], max_norm: float) -> None:
    """Per member, as torch.nn.utils.clip_grad_norm_ on that member's gradients alone."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))


@torch.no_grad()
@torch.no_grad()  # called every epoch: no graph for the validation pass
def _val(stack: Stack, t: dict[str, torch.Tensor], classify: bool,
         losses: Callable[..., tuple[torch.Tensor, torch.Tensor]]
         ) -> tuple[list[float], list[float]]:
    Xv, yv = t["X_val"], t["y_val"]
    K = stack.K
    xb = Xv.unsqueeze(0).expand(K, *Xv.shape)
    yb = yv.unsqueeze(0).expand(K, *yv.shape)
    each, out = losses(xb, yb, None, False)
    if classify:
        return each.tolist(), (out.argmax(-1) == yb).float().mean(1).tolist()
    pred = out.reshape(K, -1)
    ss_tot = float(((yv - yv.mean()) ** 2).sum())
    ss_res = ((yb - pred) ** 2).sum(1)
    r2 = (1 - ss_res / ss_tot) if ss_tot > 0 else torch.zeros(K)
    return each.tolist(), r2.tolist()


@torch.no_grad()
def _val_rows(stack: Stack, X: torch.Tensor, y: torch.Tensor, vrows: list[torch.Tensor],
              classify: bool, losses: Callable[..., tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[list[float], list[float]]:
    """Each member's validation loss and metric on its own rows of X (k-fold: its held-out
    fold), padded to one length with the padding weighted zero."""
    n = max(len(r) for r in vrows)
    idx = torch.stack([torch.cat([r, r[:1].expand(n - len(r))]) for r in vrows])
    w = torch.stack([(torch.arange(n, device=X.device) < len(r)).float() for r in vrows])
    yb = y[idx]
    each, out = losses(X[idx], yb, w, False)
    if classify:
        right = (out.argmax(-1) == yb).float()
        return each.tolist(), ((right * w).sum(1) / w.sum(1)).tolist()
    pred = out.reshape(yb.shape)
    mean = (yb * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    ss_tot = (((yb - mean) ** 2) * w).sum(1)
    ss_res = (((yb - pred) ** 2) * w).sum(1)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-30), torch.zeros_like(ss_tot))
    return each.tolist(), r2.tolist()


@torch.no_grad()
def _r2_rows(stack: Stack, X: torch.Tensor, y: torch.Tensor, rows: list[torch.Tensor],
             losses: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Each member's R² on its own training rows (as engine.train reports it)."""
    n = max(len(r) for r in rows)
    idx = torch.stack([torch.cat([r, r[:1].expand(n - len(r))]) for r in rows])
    w = torch.stack([(torch.arange(n, device=X.device) < len(r)).float() for r in rows])
    yb = y[idx]
    pred = stack.forward(X[idx], training=False).float().reshape(yb.shape)
    mean = (yb * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    ss_tot = (((yb - mean) ** 2) * w).sum(1)
    ss_res = (((yb - pred) ** 2) * w).sum(1)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-30), torch.zeros_like(ss_tot))
    return r2.tolist()
