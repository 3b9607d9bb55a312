"""Batched ensembles: K models of one architecture trained at once, on stacked parameters.

Diagnostics train the same small model many times (bootstrap rounds, learning-curve
repeats, seed repeats, validation-curve settings). One after another, each step of such a
model is bound by per-call overhead, not arithmetic. Here the K members' weights are
stacked along a leading axis, `(K, in, out)`, and one step runs every member's forward
pass as batched matrix products (`torch.baddbmm`), one backward pass, and one optimizer
update on the stacked tensors with per-member learning rates and decays as `(K, 1, ...)`
tensors. Batched products beat `torch.func.vmap` over `functional_call` on the CPU for
these MLPs (tests/benchmarks/suite.py measures both), so they are what runs.

What is batched: the built-in `mlp` and `logreg` (any activation, dropout), the optimizers
sgd, momentum, nesterov, adam and adamw (amsgrad too), every schedule (one per member,
`plateau` included), early stopping per member (the best weights kept per member), L1 and
L2 penalties, decoupled weight decay, gradient clipping per member, classification and
regression. Each member has its own training rows, seed (initialization and batch order)
and, where it may differ, its own `lr`, `weight_decay`, `l1`, `l2` and `epochs`.

With equal-length subsets (bootstrap samples, folds of one size, seed repeats) each member
draws the very batch order sequential training draws from its seed, starts from the same
initialization and applies the same update, so its history matches `engine.train`'s to
float rounding (dropout masks aside). Subsets of different lengths are stacked only when
asked (`mix_lengths`): each member then draws batch_size rows per step from its own
reshuffled subset (full batch: padded rows weighted zero), equal in distribution.

Everything else trains sequentially with `engine.train`: other architectures (the cnn,
uploads), closure optimizers (L-BFGS, Newton, BFGS), Adagrad and RMSProp, frozen layers,
augmentation, and groups of a single member. Each member's result says which path ran
and why.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from engine.data import DataBundle
from engine.recipe import Recipe, TrainConfig
from engine.schedules import LRSchedule
from engine.train import TrainResult, metric_name, to_tensors, uses_bf16

BATCHED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
PER_MEMBER = ("lr", "weight_decay", "l1", "l2", "epochs")  # train keys members may vary
_ACTS = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LeakyReLU)
_STACK_FLOATS = 2 ** 26  # members per stack are capped so a step's tensors stay ~256 MB


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: its training rows, its seed, its own settings."""

    idx: np.ndarray | None = None  # rows of the training part (None: all of them)
    # rows of the training part this member validates on (a k-fold's held-out fold); None:
    # the data's validation part, shared by every member
    val_idx: np.ndarray | None = None
    seed: int = 0  # initialization, batch order and dropout
    model: dict[str, Any] = field(default_factory=dict)  # recipe `model` overrides
    train: dict[str, Any] = field(default_factory=dict)  # recipe `train` overrides


@dataclass
class EnsembleResult:
    models: list[nn.Module]  # trained, in evaluation mode, in the members' order
    fits: list[TrainResult]  # each member's history and how it ended
    paths: list[str]  # "batched" or "sequential", per member
    reasons: list[str]  # why a member trained sequentially ("" when batched)
    seconds: float

    @property
    def path(self) -> str:
        """"batched", "sequential", or "mixed" when both ran."""
        kinds = set(self.paths)
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "batched")

    def summary(self) -> dict[str, Any]:
        """What a result records about how its models were trained."""
        return {"path": self.path, "batched": self.paths.count("batched"),
                "sequential": self.paths.count("sequential"),
                "reasons": sorted({r for r in self.reasons if r}),
                "seconds": self.seconds}


def blocker(recipe: Recipe) -> str | None:
    """Why models of this recipe cannot be trained batched, or None when they can."""
    source, cfg = recipe.model.source, recipe.train
    if source not in ("builtin:mlp", "builtin:logreg"):
        return (f"{source} is not batched (only the built-in mlp and logreg are); its "
                f"members train one after another")
    if cfg.optimizer not in BATCHED_OPTIMIZERS:
        return (f"optimizer {cfg.optimizer} is not batched (only "
                f"{', '.join(BATCHED_OPTIMIZERS)})")
    if cfg.freeze:
        return "frozen layers are not batched"
    if recipe.data.augment is not None:
        return "augmentation is not batched"
    if cfg.compile:
        return "a compiled step is not batched"
    return None


def fit_members(recipe: Recipe, data: DataBundle, members: Sequence[Member], *,
                device: torch.device | None = None, batched: bool = True,
                mix_lengths: bool = False,
                on_member: Callable[[int, int], None] | None = None) -> EnsembleResult:
    """Train one fresh model per member, batched wherever the members can share a stack.

    Members whose recipes agree on everything but `PER_MEMBER` settings (and, unless
    `mix_lengths`, on the number of training rows) form one stack; a stack of one, or one
    `blocker` refuses, trains sequentially, as does everything with `batched=False`.
    `on_member(done, total)` reports progress as members finish."""
    device = device or torch.device("cpu")
    start = time.perf_counter()
    recipes = [_member_recipe(recipe, m) for m in members]
    n_rows = [len(data.y_train) if m.idx is None else len(m.idx) for m in members]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(recipes):
        raw = r.to_dict()
        for key in PER_MEMBER:
            raw["train"].pop(key)
        key = json.dumps([raw["model"], raw["train"], raw["data"].get("augment"),
                          None if mix_lengths else n_rows[i]], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    models: list[nn.Module | None] = [None] * len(members)
    fits: list[TrainResult | None] = [None] * len(members)
    paths, reasons = [""] * len(members), [""] * len(members)
    tensors = to_tensors(data, device)
    done = 0
    for ids in groups.values():
        why = ("batching was switched off" if not batched else
               "a single member gains nothing from batching" if len(ids) == 1 else
               blocker(recipes[ids[0]]))
        if why is None:
            for chunk in _chunks(ids, recipes[ids[0]], data, n_rows):
                trained = train_stacked(recipes[chunk[0]], data,
                                        [members[i] for i in chunk],
                                        [recipes[i].train for i in chunk],
                                        device=device, tensors=tensors)
                for i, (model, fit) in zip(chunk, trained, strict=True):
                    models[i], fits[i], paths[i] = model, fit, "batched"
                    done += 1
                    if on_member is not None:
                        on_member(done, len(members))
            continue
        for i in ids:
            models[i], fits[i] = _sequential(recipes[i], data, members[i], device)
            paths[i], reasons[i] = "sequential", why
            done += 1
            if on_member is not None:
                on_member(done, len(members))
    return EnsembleResult(models, fits, paths, reasons,  # type: ignore[arg-type]
                          time.perf_counter() - start)


def _member_recipe(recipe: Recipe, m: Member) -> Recipe:
    if not m.model and not m.train:
        return recipe
    raw = recipe.to_dict()
    raw["model"] = {**raw["model"], **m.model}
    raw["train"] = {**raw["train"], **m.train}
    return Recipe.from_dict(raw)


def _chunks(ids: list[int], recipe: Recipe, data: DataBundle,
            n_rows: list[int]) -> list[list[int]]:
    """Split a stack so one step's inputs, activations and state stay within budget."""
    cfg = recipe.train
    n = max(n_rows[i] for i in ids)
    batch = n if cfg.batch_size == "full" else min(int(cfg.batch_size), n)
    n_out = data.n_classes if data.task == "classification" else 1
    hidden = list(recipe.model.hidden) if recipe.model.source == "builtin:mlp" else []
    dims = [math.prod(data.input_shape), *hidden, n_out]
    params = sum(a * b for a, b in itertools.pairwise(dims))
    rows = max(batch, len(data.y_val), n if data.task != "classification" else 0)
    per_member = rows * (dims[0] + 3 * sum(dims[1:])) + 6 * params
    size = max(1, _STACK_FLOATS // per_member)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _sequential(recipe: Recipe, data: DataBundle, m: Member,
                device: torch.device) -> tuple[nn.Module, TrainResult]:
    from engine.diagnostics import subset
    from engine.models import build_model, set_training
    from engine.train import train

    part = data if m.idx is None else subset(data, m.idx)
    if m.val_idx is not None:  # its own held-out rows, as a k-fold trains each fold
        part = dataclasses.replace(part, X_val=data.X_train[m.val_idx],
                                   y_val=data.y_train[m.val_idx])
    n_out = data.n_classes if data.task == "classification" else 1
    net = build_model(recipe.model, data.input_shape, n_out, seed=m.seed).to(device)
    fit = train(net, part, recipe.train, device=device, seed=m.seed)
    set_training(net, False)
    return net, fit


# --- the stacked model -----------------------------------------------------------------

class Stack:
    """K copies of one Sequential MLP as stacked tensors, with a batched forward pass."""

    def __init__(self, nets: Sequence[nn.Module], device: torch.device) -> None:
        self.K = len(nets)
        self.ops: list[tuple[str, Any]] = []
        self.params: list[torch.Tensor] = []
        self.is_weight: list[bool] = []
        self.linears: list[list[nn.Linear]] = []
        for layers in zip(*(net.children() for net in nets), strict=True):
            first = layers[0]
            if isinstance(first, nn.Flatten):
                self.ops.append(("flatten", None))
            elif isinstance(first, nn.Linear):
                # (K, in, out): the layout whose gradient autograd can keep without a copy
                w = torch.stack([m.weight.detach().T for m in layers]).to(device).contiguous()
                b = torch.stack([m.bias.detach() for m in layers]).to(device)
                self.ops.append(("linear", len(self.params)))
                self.params += [w.requires_grad_(), b.requires_grad_()]
                self.is_weight += [True, False]
                self.linears.append(list(layers))
            elif isinstance(first, _ACTS):
                self.ops.append(("act", first))
            elif isinstance(first, nn.Dropout):
                self.ops.append(("dropout", first.p))
            else:
                raise TypeError(f"layer {type(first).__name__} cannot be stacked")

    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        """x: (K, B, *sample shape) -> (K, B, outputs)."""
        h = x
        for kind, arg in self.ops:
            if kind == "flatten":
                h = h.reshape(h.shape[0], h.shape[1], -1)
            elif kind == "linear":
                w, b = self.params[arg], self.params[arg + 1]
                h = torch.baddbmm(b.unsqueeze(1), h, w)
            elif kind == "act":
                h = arg(h)
            elif training and arg > 0:
                h = functional.dropout(h, arg, True)
        return h

    def write_back(self) -> None:
        """Copy the stacked weights into the members' own modules."""
        with torch.no_grad():
            for j, layers in enumerate(self.linears):
                w, b = self.params[2 * j], self.params[2 * j + 1]
                for k, lin in enumerate(layers):
                    lin.weight.copy_(w[k].T)
                    lin.bias.copy_(b[k])


def _per(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A (K,) list of member settings shaped to broadcast against a stacked tensor."""
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1)))


class StackedOptimizer:
    """sgd, momentum, nesterov, adam and adamw on stacked tensors, each member with its own
    learning rate; the update rules are torch.optim's, so a member steps as it would alone.

    Adam's moments and its step direction come from torch's fused kernel (the one
    `engine.train` uses), run at lr 1 on a zeroed buffer; each member's direction is then
    scaled by its own rate in one broadcast multiply-add per tensor."""

    def __init__(self, name: str, params: list[torch.Tensor], is_weight: list[bool],
                 cfg: TrainConfig) -> None:
        self.name, self.params, self.is_weight = name, params, is_weight
        self.momentum = cfg.momentum
        opts = cfg.optimizer_options
        self.b1, self.b2 = opts.get("beta1", 0.9), opts.get("beta2", 0.999)
        self.eps, self.amsgrad = opts.get("eps", 1e-8), opts.get("amsgrad", False)
        self.adam = name in ("adam", "adamw")
        self.fused = self.adam and params[0].device.type in ("cpu", "cuda")
        self.t = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        if self.adam:
            zeros = [torch.zeros_like(p) for p in params]
            self.m, self.v = zeros, [torch.zeros_like(p) for p in params]
            self.vmax = [torch.zeros_like(p) for p in params] if self.amsgrad else []
            self.dirs = [torch.zeros_like(p) for p in params]
            self.steps = [torch.zeros((), device=p.device) for p in params]

    @torch.no_grad()
    def step(self, lr: torch.Tensor, decay: torch.Tensor) -> None:
        """`lr`: (K,) rates (0 for members that no longer train); `decay`: (K,) decoupled
        weight decay, applied before the update for adamw (torch's AdamW) and after it for
        the others (engine.regularization.decay_)."""
        self.t += 1
        rates = [lr.view(-1, *([1] * (p.ndim - 1))) for p in self.params]
        decays = bool((decay > 0).any())
        shrink = [1 - r * decay.view_as(r) if w and decays else None
                  for r, w in zip(rates, self.is_weight, strict=True)]
        if self.name == "adamw":
            for p, s in zip(self.params, shrink, strict=True):
                if s is not None:
                    p.mul_(s)
        if self.adam:
            self._adam_directions()
            for p, d, r in zip(self.params, self.dirs, rates, strict=True):
                p.addcmul_(d, r)  # d is minus the member's Adam step at rate 1
        else:
            for p, st, r in zip(self.params, self.state, rates, strict=True):
                g = p.grad
                d = g
                if self.name in ("momentum", "nesterov"):
                    if "buf" not in st:
                        st["buf"] = g.clone()
                    else:
                        st["buf"].mul_(self.momentum).add_(g)
                    d = g.add(st["buf"], alpha=self.momentum) if self.name == "nesterov" \
                        else st["buf"]
                p.addcmul_(d, r, value=-1)
        if self.name != "adamw":
            for p, s in zip(self.params, shrink, strict=True):
                if s is not None:
                    p.mul_(s)
        for p in self.params:
            p.grad = None

    def _adam_directions(self) -> None:
        grads = [p.grad for p in self.params]
        torch._foreach_zero_(self.dirs)
        if self.fused:
            torch._foreach_add_(self.steps, 1)
            torch._fused_adam_(self.dirs, grads, self.m, self.v, self.vmax, self.steps,
                               amsgrad=self.amsgrad, lr=1.0, beta1=self.b1, beta2=self.b2,
                               weight_decay=0.0, eps=self.eps, maximize=False)
            return
        bc1 = 1 - self.b1 ** self.t
        bc2_sqrt = math.sqrt(1 - self.b2 ** self.t)
        for i, g in enumerate(grads):
            self.m[i].lerp_(g, 1 - self.b1)
            self.v[i].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            v = self.v[i]
            if self.amsgrad:
                torch.maximum(self.vmax[i], v, out=self.vmax[i])
                v = self.vmax[i]
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            self.dirs[i].addcdiv_(self.m[i], denom, value=-1 / bc1)


# --- training --------------------------------------------------------------------------

def train_stacked(recipe: Recipe, data: DataBundle, members: Sequence[Member],
                  cfgs: Sequence[TrainConfig], *, device: torch.device,
                  tensors: dict[str, torch.Tensor] | None = None
                  ) -> list[tuple[nn.Module, TrainResult]]:
    """Train the members (one architecture, `cfgs` differing only in `PER_MEMBER` keys)
    as one stack; returns each member's model and result, as `engine.train` would."""
    from engine.models import build_model, set_training
    from engine.regularization import EarlyStopping

    start = time.perf_counter()
    t = tensors or to_tensors(data, device)
    X, y = t["X_train"], t["y_train"]
    K, cfg = len(members), cfgs[0]
    n_out = data.n_classes if data.task == "classification" else 1
    nets = [build_model(recipe.model, data.input_shape, n_out, seed=m.seed) for m in members]
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
        from engine.errors import UserError

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
