"""Optimizers the user can pick: first-order ones from torch.optim, and second-order ones.

Every entry builds a `torch.optim.Optimizer` from parameter groups. First-order methods
take a plain `step()`. `lbfgs`, `newton` and `bfgs` take a closure `closure(backward)` that
evaluates the objective (data loss plus penalties) on the current batch; with
`batch_size: "full"` that is the whole training part, as the textbook methods assume.

`newton` forms the exact Hessian and `bfgs` a dense inverse-Hessian estimate, n x n for n
parameters: both are refused above `max_params` (2,000 and 5,000 by default: a 2,000 x
2,000 Hessian costs 2,000 backward passes and a Cholesky solve per iteration; a 5,000 x
5,000 BFGS matrix is 100 MB), with L-BFGS suggested instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.errors import UserError
from engine.registry import Param, Registry

OPTIMIZERS = Registry("optimizers", "optimizer", "Optimization methods for training.")

Groups = list[dict[str, Any]]
_EPS = Param("eps", "float", 1e-8, "added to denominators for stability", low=0.0, log=True)
_ITERS = "iterations per training step (an epoch of full-batch training is one step)"


def _fused(groups: Groups) -> dict[str, Any]:
    """torch's fused kernels: one call per step instead of one per tensor (CPU and CUDA)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    return {"fused": True} if devices <= {"cpu", "cuda"} else {}


# `train.momentum`, the recipe's older spelling, is moved into these two's options
_MOMENTUM = Param("momentum", "float", 0.9, "fraction of the previous step kept (velocity "
                  "decay)", low=0.0, high=0.999)


@OPTIMIZERS.register("sgd", "Gradient descent: batch (batch_size \"full\"), stochastic "
                     "(batch_size 1) or mini-batch (any other size).", default_lr=0.01)
def sgd(groups: Groups, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, **_fused(groups))


@OPTIMIZERS.register("momentum", "Gradient descent with heavy-ball momentum.",
                     params=(_MOMENTUM,), default_lr=0.01, train_momentum=True)
def momentum_sgd(groups: Groups, lr: float, *, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, **_fused(groups))


@OPTIMIZERS.register("nesterov", "Gradient descent with Nesterov's accelerated momentum.",
                     params=(_MOMENTUM,), default_lr=0.01, train_momentum=True)
def nesterov(groups: Groups, lr: float, *, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **_fused(groups))


@OPTIMIZERS.register("adagrad", "Adagrad: per-parameter rates shrinking with the sum of past "
                     "squared gradients.", params=(
    Param("eps", "float", 1e-10, "added to the denominator", low=0.0, log=True),
    Param("initial_accumulator", "float", 0.0, "starting sum of squared gradients", low=0.0),
), default_lr=0.01)
def adagrad(groups: Groups, lr: float, *, eps: float,
            initial_accumulator: float) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=lr, eps=eps,
                               initial_accumulator_value=initial_accumulator, **_fused(groups))


@OPTIMIZERS.register("rmsprop", "RMSProp: rates scaled by a running average of squared "
                     "gradients.", params=(
    Param("alpha", "float", 0.99, "smoothing of the squared-gradient average", low=0.0,
          high=1.0),
    _EPS,
    Param("momentum", "float", 0.0, "momentum on top of the scaled step", low=0.0, high=0.999),
    Param("centered", "bool", False, "divide by the gradient's variance, not its 2nd moment"),
), default_lr=0.001)
def rmsprop(groups: Groups, lr: float, **options: Any) -> torch.optim.Optimizer:
    # RMSProp's own momentum option defaults to 0, as in torch; train.momentum is not it
    return torch.optim.RMSprop(groups, lr=lr, **options)


_ADAM_PARAMS = (
    Param("beta1", "float", 0.9, "decay of the gradient's running mean", low=0.0, high=0.9999),
    Param("beta2", "float", 0.999, "decay of the squared gradient's running mean", low=0.0,
          high=0.99999),
    _EPS,
    Param("amsgrad", "bool", False, "keep the maximum of the second moment (AMSGrad)"),
)


@OPTIMIZERS.register("adam", "Adam: momentum and RMSProp-style scaling with bias correction.",
                     params=_ADAM_PARAMS, default_lr=0.001)
def adam(groups: Groups, lr: float, *, beta1: float, beta2: float, eps: float,
         amsgrad: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad,
                            **_fused(groups))


@OPTIMIZERS.register("adamw", "AdamW: Adam with decoupled weight decay (train.weight_decay).",
                     params=_ADAM_PARAMS, default_lr=0.001, native_decay=True)
def adamw(groups: Groups, lr: float, *, beta1: float, beta2: float,
          eps: float, amsgrad: bool) -> torch.optim.Optimizer:
    # the groups carry weight_decay; AdamW applies it as w <- w - lr * wd * w
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad,
                             **_fused(groups))


@OPTIMIZERS.register("lbfgs", "L-BFGS: a quasi-Newton method keeping a few recent curvature "
                     "pairs; best with batch_size \"full\".", params=(
    Param("max_iter", "int", 20, _ITERS, low=1),
    Param("history_size", "int", 10, "curvature pairs kept", low=1),
    Param("line_search", "bool", True, "strong Wolfe line search (else a fixed step of lr)"),
    Param("tolerance_grad", "float", 1e-7, "stop when the gradient is this small", low=0.0,
          log=True),
), default_lr=1.0, closure=True)
def lbfgs(groups: Groups, lr: float, *, max_iter: int, history_size: int,
          line_search: bool, tolerance_grad: float) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    return torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history_size,
                             line_search_fn="strong_wolfe" if line_search else None,
                             tolerance_grad=tolerance_grad, tolerance_change=1e-12)


def _flat_params(groups: Groups) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def _check_size(params: list[torch.Tensor], limit: int, method: str) -> None:
    n = sum(p.numel() for p in params)
    if n > limit:
        raise UserError(f"{method} needs an {n} x {n} matrix for this model's {n} trainable "
                        f"parameters, above its limit of {limit}; use lbfgs instead, or raise "
                        f"train.optimizer_options.max_params if the machine can afford it.")


class _SecondOrder(torch.optim.Optimizer):
    """Shared pieces of Newton and BFGS: flat vectors and a backtracking line search."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, max_iter: int) -> None:
        super().__init__(list(params), {"lr": lr})
        self.max_iter = max_iter
        self.params = [p for g in self.param_groups for p in g["params"]]

    def _gather(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _add(self, direction: torch.Tensor, t: float) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.add_(direction[offset:offset + n].view_as(p), alpha=t)
                offset += n

    def _line_search(self, closure: Callable[..., torch.Tensor], loss: float,
                     grad: torch.Tensor, direction: torch.Tensor) -> float:
        """Armijo backtracking from the step lr; returns the accepted step (0 if none)."""
        t = self.param_groups[0]["lr"]
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction: take a small gradient step instead
            return 0.0
        for _ in range(30):
            self._add(direction, t)
            with torch.no_grad():
                trial = float(closure(backward=False))
            if trial <= loss + 1e-4 * t * slope:
                return t
            self._add(direction, -t)
            t *= 0.5
        return 0.0


class Newton(_SecondOrder):
    """Newton's method with the exact Hessian, Levenberg damping and a line search."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, max_iter: int,
                 damping: float) -> None:
        super().__init__(params, lr, max_iter)
        self.damping = damping

    def step(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        first = None
        for _ in range(self.max_iter):
            loss = closure(backward=False)
            first = loss.detach() if first is None else first
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            g = self._gather(grads)
            hessian = self._hessian(g)
            direction = -self._solve(hessian, g.detach())
            if self._line_search(closure, float(loss.detach()), g.detach(), direction) == 0.0:
                break  # no decrease along the Newton direction: converged to precision
        return first

    def _hessian(self, g: torch.Tensor) -> torch.Tensor:
        n = g.numel()
        eye = torch.eye(n, device=g.device, dtype=g.dtype)
        rows = torch.autograd.grad(g, self.params, grad_outputs=eye, is_grads_batched=True,
                                   allow_unused=True)
        rows = [torch.zeros((n, p.numel()), device=g.device) if r is None else r.reshape(n, -1)
                for r, p in zip(rows, self.params, strict=True)]
        h = torch.cat(rows, dim=1).detach()
        return (h + h.T) / 2

    def _solve(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Solve (H + mu I) d = g, raising mu until H + mu I is positive definite."""
        eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        mu = self.damping
        for _ in range(20):
            chol, info = torch.linalg.cholesky_ex(h + mu * eye)
            if int(info) == 0:
                return torch.cholesky_solve(g.unsqueeze(1), chol).squeeze(1)
            mu = max(mu * 10, 1e-6)
        return g  # hopelessly indefinite: fall back to the gradient


class BFGS(_SecondOrder):
    """BFGS with a dense inverse-Hessian estimate (Nocedal & Wright, algorithm 6.1)."""

    def step(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        first = None
        state = self.state["bfgs"] = self.state.get("bfgs", {})
        for _ in range(self.max_iter):
            loss = closure(backward=True)
            first = loss.detach() if first is None else first
            g = self._gather(p.grad if p.grad is not None else torch.zeros_like(p)
                             for p in self.params).detach()
            if "prev_g" in state:  # update H from the last step's curvature pair
                s, y = state["s"], g - state["prev_g"]
                sy = float(s @ y)
                if sy > 1e-10:
                    h = state.get("h")
                    if h is None:  # first pair: scale the identity (N&W eq. 6.20)
                        h = torch.eye(g.numel(), device=g.device) * (sy / float(y @ y))
                    rho = 1.0 / sy
                    hy = h @ y
                    h = (h - rho * (torch.outer(s, hy) + torch.outer(hy, s))
                         + (rho * rho * float(y @ hy) + rho) * torch.outer(s, s))
                    state["h"] = h
            h = state.get("h")
            direction = -(h @ g) if h is not None else -g
            t = self._line_search(closure, float(loss.detach()), g, direction)
            if t == 0.0:
                state.pop("h", None)  # a stale estimate: restart from the gradient next time
                state.pop("prev_g", None)
                break
            state["s"], state["prev_g"] = t * direction, g
        return first


@OPTIMIZERS.register("newton", "Newton's method: steps by the exact Hessian's inverse with a "
                     "line search; for small models (up to max_params parameters).", params=(
    Param("max_iter", "int", 1, _ITERS, low=1),
    Param("damping", "float", 1e-4, "added to the Hessian's diagonal (Levenberg)", low=0.0,
          log=True),
    Param("max_params", "int", 2000, "refuse models with more trainable parameters", low=1),
), default_lr=1.0, closure=True, deterministic_loss=True)
def newton(groups: Groups, lr: float, *, max_iter: int, damping: float,
           max_params: int) -> torch.optim.Optimizer:
    params = _flat_params(groups)
    _check_size(params, max_params, "newton")
    return Newton(params, lr, max_iter, damping)


@OPTIMIZERS.register("bfgs", "BFGS: a quasi-Newton method with a dense inverse-Hessian "
                     "estimate and a line search; for models up to max_params parameters.",
                     params=(
    Param("max_iter", "int", 10, _ITERS, low=1),
    Param("max_params", "int", 5000, "refuse models with more trainable parameters", low=1),
), default_lr=1.0, closure=True, deterministic_loss=True)
def bfgs(groups: Groups, lr: float, *, max_iter: int,
         max_params: int) -> torch.optim.Optimizer:
    params = _flat_params(groups)
    _check_size(params, max_params, "bfgs")
    return BFGS(params, lr, max_iter)


def make_optimizer(name: str, groups: Groups, lr: float,
                   options: dict[str, Any]) -> torch.optim.Optimizer:
    """Build the named optimizer over `groups` with its resolved options."""
    entry = OPTIMIZERS.get(name)
    return entry.fn(groups, lr, **entry.resolve(options, "train.optimizer_options"))
