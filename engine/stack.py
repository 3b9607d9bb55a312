"""K models of one Sequential MLP as stacked tensors, and their optimizer.

The members' weights are stacked along a leading axis, `(K, in, out)`: one step runs
every member's forward pass as batched matrix products (`torch.baddbmm`), one backward
pass, and one optimizer update on the stacked tensors with per-member learning rates and
decays as `(K, 1, ...)` tensors. `engine.ensemble` decides which members can share a
stack; `engine.stack_train` trains one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from engine.recipe import TrainConfig

_ACTS = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LeakyReLU)


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
        opts = cfg.optimizer_options
        self.momentum = opts.get("momentum", 0.0)
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


