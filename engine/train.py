"""The training loop: data resident on the device, batches by index permutation.

No DataLoader: the whole training part is one tensor on the device and each epoch draws a
permutation and slices it, so a step costs the model's arithmetic and little else (the
benchmark in tests/benchmarks/ measures this against the textbook loop). Precision follows
`train.precision`: bf16 autocast on CUDA by default, float32 on the CPU unless bf16 is asked
for (CPU autocast then runs, correct but slower on CPUs without bf16 units);
`train.compile` wraps the model in `torch.compile` for the training steps (evaluation stays
eager). How a run trained is in `TrainResult.path`. The history is kept per epoch; a NaN
or infinite loss stops training with a message naming the likely cause, keeping the
history so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle, augment, subset
from engine.errors import UserError
from engine.metrics import evaluate, loss_fn, metric_name
from engine.models import build_model, set_training
from engine.optimizers import OPTIMIZERS, make_optimizer
from engine.recipe import AugmentConfig, Recipe, TrainConfig
from engine.regularization import Regularizers, freeze, is_weight
from engine.schedules import LRSchedule
from engine.sections import resolve_sections

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    best_epoch: int | None  # the epoch whose weights the model ends with (early stopping)
    stopped: str  # "completed", "early_stopping" or "diverged"
    message: str = ""  # for "diverged": what happened and what to try
    seconds: float = 0.0
    # how it ran: {"device", "precision" ("fp32" or "bf16"), "compiled", "ensemble"}
    path: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but this machine has no CUDA GPU; "
                        f"set device to 'auto' or 'cpu'.")
    return torch.device(name)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training autocasts to bf16: precision "bf16" anywhere, or "auto" on CUDA
    with amp on; never for closure optimizers (their line searches compare losses)."""
    if OPTIMIZERS.get(cfg.optimizer).extra.get("closure") or cfg.precision == "fp32":
        return False
    return cfg.precision == "bf16" or (device.type == "cuda" and cfg.amp)


def to_tensors(data: DataBundle, device: torch.device) -> dict[str, torch.Tensor]:
    """Every split on the device once; labels int64 (classes) or float32 (regression)."""
    ydtype = torch.long if data.task == "classification" else torch.float32
    out = {}
    for part in ("train", "val", "test"):
        out[f"X_{part}"] = torch.as_tensor(getattr(data, f"X_{part}"), dtype=torch.float32,
                                           device=device)
        out[f"y_{part}"] = torch.as_tensor(getattr(data, f"y_{part}"), dtype=ydtype,
                                           device=device)
    return out


def train(model: nn.Module, data: DataBundle, cfg: TrainConfig, *, device: torch.device,
          seed: int, augment_cfg: AugmentConfig | None = None,
          on_progress: ProgressFn | None = None,
          tensors: dict[str, torch.Tensor] | None = None,
          after_step: Callable[[nn.Module], None] | None = None,
          loss_override: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
          | None = None, frozen_norms: bool = False) -> TrainResult:
    """Train `model` in place on `data` as `cfg` says; return the history and how it ended.

    Compression hooks in here: `after_step(model)` runs after every optimizer step (to
    re-apply a pruning mask or a weight-sharing constraint), `loss_override(out, xb, yb)`
    replaces the task loss (distillation), and `frozen_norms` keeps every BatchNorm in
    eval mode (its running statistics used and kept, its scale and shift still trained)."""
    t = tensors or to_tensors(data, device)
    X, y = t["X_train"], t["y_train"]
    n = len(X)
    has_val = len(t["X_val"]) > 0
    if cfg.early_stopping is not None and not has_val:
        raise UserError("early stopping needs a validation part; set data.val_fraction above "
                        "0 or train.early_stopping to null.")
    entry = OPTIMIZERS.get(cfg.optimizer)
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    if entry.extra.get("deterministic_loss") and dropout:
        raise UserError(f"{cfg.optimizer} needs a deterministic loss, but the model uses "
                        f"dropout; set model.dropout to 0 or pick lbfgs.")

    freeze(model, cfg.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if is_weight(p)]
    others = [p for p in trainable if not is_weight(p)]
    native_decay = entry.extra.get("native_decay", False)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay if native_decay else 0.0}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.optimizer_options)
    schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.epochs)
    regularizers = Regularizers(cfg, native_decay=native_decay)  # through the registry
    stopper = regularizers.stopper
    criterion = loss_fn(data.task)
    metric = metric_name(data.task)
    batch = n if cfg.batch_size == "full" else min(int(cfg.batch_size), n)
    uses_closure = entry.extra.get("closure", False)
    autocast = uses_bf16(cfg, device)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    path: dict[str, Any] = {"device": device.type, "precision": "bf16" if autocast else "fp32",
                            "compiled": False, "ensemble": "single"}
    if cfg.compile:
        # static shapes: the last, shorter batch of an epoch gets its own graph
        forward = torch.compile(model, dynamic=False)
        path["compiled"] = True
    gen = torch.Generator(device=device).manual_seed(seed)
    augmenting = augment_cfg is not None and data.is_image

    history: dict[str, list[float]] = {k: [] for k in (
        "epoch", "train_loss", f"train_{metric}", "val_loss", f"val_{metric}", "lr", "time_s")}
    start = time.perf_counter()
    stopped, message = "completed", ""

    def run_model(xb: torch.Tensor) -> torch.Tensor:
        nonlocal forward
        if forward is model:
            return model(xb)
        try:
            return forward(xb)
        except Exception as exc:  # no compiler, an unsupported layer: train eagerly
            forward = model
            path["compiled"] = False
            path["note"] = (f"torch.compile failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
                            f"); trained eagerly")
            return model(xb)

    def objective(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if autocast:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = run_model(xb)
        else:  # entering a disabled autocast still costs microseconds a step
            out = run_model(xb)
        if loss_override is not None:
            data_loss = loss_override(out.float(), xb, yb)
        else:
            data_loss = criterion(out.float(), yb)
        extra = regularizers.penalty(weights)
        return (data_loss if extra is None else data_loss + extra), out

    for epoch in range(cfg.epochs):
        lr = schedule.lr(epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        set_training(model, True)
        if frozen_norms:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        order = torch.randperm(n, generator=gen, device=device) if batch < n else None
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device)
        for i in range(0, n, batch):
            idx = order[i:i + batch] if order is not None else slice(None)
            xb, yb = X[idx], y[idx]
            if augmenting:
                xb = augment(xb, augment_cfg, gen)
            if uses_closure:
                def closure(backward: bool = True, xb=xb, yb=yb) -> torch.Tensor:
                    if backward:
                        optimizer.zero_grad(set_to_none=True)
                    loss, _ = objective(xb, yb)
                    if backward:
                        loss.backward()
                        regularizers.on_gradients(trainable)
                    return loss
                loss = optimizer.step(closure)
                with torch.no_grad():
                    _, out = objective(xb, yb)  # the batch's loss after the step
                    loss = criterion(out.float(), yb)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss, out = objective(xb, yb)
                loss.backward()
                regularizers.on_gradients(trainable)
                optimizer.step()
                if regularizers.penalties and loss_override is None:
                    loss = criterion(out.detach().float(), yb)  # the data loss alone
            regularizers.after_step(weights, lr)
            if after_step is not None:
                after_step(model)
            rows = len(yb)
            loss_sum += loss.detach().float() * rows
            if metric == "accuracy":
                hits += (out.detach().argmax(1) == yb).sum()
        train_loss = float(loss_sum) / n
        if not math.isfinite(train_loss):
            stopped = "diverged"
            message = (f"the training loss became {train_loss} in epoch {epoch + 1}, so "
                       f"training stopped; the learning rate ({lr:g}) is likely too high for "
                       f"{cfg.optimizer}: lower it ten-fold or set train.grad_clip.")
            break
        if metric == "accuracy":
            train_metric = float(hits) / n
        else:
            train_metric = evaluate(model, X, y, data.task)["r2"]
        val = evaluate(model, t["X_val"], t["y_val"], data.task) if has_val else {}
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(train_loss)
        history[f"train_{metric}"].append(train_metric)
        history["val_loss"].append(val.get("loss", math.nan))
        history[f"val_{metric}"].append(val.get(metric, math.nan))
        history["lr"].append(lr)
        history["time_s"].append(time.perf_counter() - start)
        if on_progress is not None:
            on_progress({"event": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs,
                         **{k: v[-1] for k, v in history.items() if k != "epoch"}})
        if has_val:
            schedule.observe(val["loss"])
            if stopper is not None and stopper.update(epoch + 1, val["loss"], model):
                stopped = "early_stopping"
                break

    best_epoch = history["epoch"][-1] if history["epoch"] else None
    if stopper is not None and stopped != "diverged" and stopper.restore(model):
        best_epoch = stopper.best_epoch
    set_training(model, False)
    return TrainResult(history, best_epoch, stopped, message, time.perf_counter() - start,
                       path)


def fit_fresh(recipe: Recipe, data: DataBundle, idx: np.ndarray | None = None, *,
              seed: int | None = None, device: torch.device | None = None,
              model: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
              tensors: dict[str, torch.Tensor] | None = None,
              on_progress: ProgressFn | None = None) -> tuple[nn.Module, TrainResult]:
    """A freshly initialized model of the recipe, trained on the training rows `idx` (all
    when None): the one way every part of the engine builds and trains a new model.

    `model` and `train` override recipe sections (a validation curve's width, say); the
    seed (the recipe's when None) sets the initialization, the batch order and dropout.
    Returns the model in evaluation mode on `device` (the CPU by default) and its result."""
    device = device or torch.device("cpu")
    seed = recipe.seed if seed is None else seed
    if model or train:
        raw = recipe.to_dict()
        raw["model"] = {**raw["model"], **(model or {})}
        raw["train"] = {**raw["train"], **(train or {})}
        recipe = resolve_sections(Recipe.from_dict(raw))
    part = data if idx is None else subset(data, idx)
    net = build_model(recipe.model, data.input_shape, data.n_outputs, seed=seed).to(device)
    fit = run_training(net, part, recipe.train, device=device, seed=seed,
                       augment_cfg=recipe.data.augment, tensors=tensors,
                       on_progress=on_progress)
    set_training(net, False)
    return net, fit


run_training = train  # `fit_fresh`'s `train` argument is a section, not this function
