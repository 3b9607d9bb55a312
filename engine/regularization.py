"""Regularization: penalties, decoupled weight decay, early stopping, clipping, freezing.

Each regularizer is a registry entry whose code training calls through the registry: its
`stage` says where it acts (`loss`: a penalty term added to the loss; `gradient`: on the
gradients before a step; `after_step`: on the weights after one; `epoch`: after each
epoch's validation; `model`: built into the model) and its `setting` which recipe field
switches it on. `Regularizers(cfg)` is what one training run applies; adding an entry
here reaches the trainer without touching it. The defaults are the recipe's own.

Penalties and decay apply to weights (tensors of two or more dimensions), never to biases:
shrinking a bias toward zero only shifts the decision boundary, and scikit-learn's
`LogisticRegression` leaves its intercept unpenalized too, so their losses compare.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from engine.errors import UserError
from engine.recipe import EarlyStoppingConfig, ModelConfig, TrainConfig
from engine.registry import Entry, Param, Registry

REGULARIZERS = Registry("regularizers", "regularizer",
                        "Ways to keep a model from fitting noise, set in the train section.")
_ES = EarlyStoppingConfig()


def is_weight(p: torch.Tensor) -> bool:
    return p.ndim >= 2


@REGULARIZERS.register("l1", "L1 penalty: adds train.l1 * sum(|w|) to the loss, driving "
                       "weights to exactly zero (sparse models).",
                       params=(Param("l1", "float", TrainConfig.l1, "penalty strength",
                                     low=0.0),), stage="loss", setting="l1")
def l1_penalty(weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    return strength * sum(w.abs().sum() for w in weights)


@REGULARIZERS.register("l2", "L2 penalty (coupled): adds train.l2 / 2 * sum(w^2) to the "
                       "loss, so its gradient passes through the optimizer's scaling.",
                       params=(Param("l2", "float", TrainConfig.l2, "penalty strength",
                                     low=0.0),), stage="loss", setting="l2")
def l2_penalty(weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    return 0.5 * strength * sum(w.pow(2).sum() for w in weights)


@REGULARIZERS.register("weight_decay", "Decoupled weight decay: w <- w - lr * weight_decay * w "
                       "after each step, independent of the gradient (AdamW's rule, used for "
                       "every optimizer).", params=(
    Param("weight_decay", "float", TrainConfig.weight_decay, "decay per unit learning rate",
          low=0.0),), stage="after_step", setting="weight_decay")
def decay_(weights: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """Shrink `weights` in place (they are the trainer's own parameters)."""
    if weight_decay > 0 and weights:
        with torch.no_grad():
            torch._foreach_mul_(weights, 1 - lr * weight_decay)


@REGULARIZERS.register("dropout", "Dropout: zeroes each hidden unit with probability "
                       "model.dropout during training.", params=(
    Param("dropout", "float", ModelConfig.dropout, "drop probability", low=0.0, high=0.95),),
    stage="model", setting="model.dropout")
def dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


@REGULARIZERS.register("grad_clip", "Gradient clipping: scales the gradient down when its "
                       "global L2 norm exceeds train.grad_clip.", params=(
    Param("grad_clip", "float", TrainConfig.grad_clip, "largest gradient norm allowed "
          "(null: off)", low=0.0),), stage="gradient", setting="grad_clip")
def clip_(params: list[torch.Tensor], max_norm: float | None) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


@REGULARIZERS.register("early_stopping", "Early stopping: ends training when the validation "
                       "loss has not improved for patience epochs and restores the best "
                       "epoch's weights.", params=(
    Param("patience", "int", _ES.patience, "epochs without improvement", low=1),
    Param("min_delta", "float", _ES.min_delta, "smallest improvement that counts", low=0.0),
    Param("restore_best", "bool", _ES.restore_best, "end with the best epoch's weights"),
), stage="epoch", setting="early_stopping")
class EarlyStopping:
    """Watch the validation loss; keep the best weights; say when to stop."""

    def __init__(self, patience: int, min_delta: float, restore_best: bool) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.restore_best = restore_best
        self.best = math.inf
        self.best_epoch = 0
        self.bad = 0
        self._state: dict[str, Any] | None = None

    def update(self, epoch: int, val_loss: float, model: nn.Module) -> bool:
        """Record an epoch; return True when training should stop."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            if self.restore_best:
                self._state = copy.deepcopy(model.state_dict())
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into `model`; False when there is nothing to load."""
        if not self.restore_best or self._state is None:
            return False
        model.load_state_dict(self._state)
        return True


def _setting(entry: Entry, cfg: TrainConfig) -> Any:
    """The train setting that switches `entry` on (None or 0 when it is off)."""
    return getattr(cfg, entry.extra["setting"])


class Regularizers:
    """The registry's regularizers that one training run's settings switch on, by stage.

    `native_decay`: the optimizer applies weight decay itself (AdamW's parameter groups),
    so the after-step decay is left to it."""

    def __init__(self, cfg: TrainConfig, *, native_decay: bool = False) -> None:
        on = [(e, _setting(e, cfg)) for e in REGULARIZERS
              if not e.extra["setting"].startswith("model.") and _setting(e, cfg)]
        self.penalties = [(e.fn, v) for e, v in on if e.extra["stage"] == "loss"]
        self.gradient = [(e.fn, v) for e, v in on if e.extra["stage"] == "gradient"]
        self.after = [(e.fn, v) for e, v in on if e.extra["stage"] == "after_step"
                      and not (native_decay and e.name == "weight_decay")]
        self.stopper = next((e.fn(**_early(v)) for e, v in on if e.extra["stage"] == "epoch"),
                            None)

    def penalty(self, weights: list[torch.Tensor]) -> torch.Tensor | None:
        """The penalty terms on `weights`, or None when none is on (no graph cost)."""
        total = None
        for fn, strength in self.penalties:
            term = fn(weights, strength)
            total = term if total is None else total + term
        return total

    def on_gradients(self, params: list[torch.Tensor]) -> None:
        for fn, value in self.gradient:
            fn(params, value)

    def after_step(self, weights: list[torch.Tensor], lr: float) -> None:
        for fn, value in self.after:
            fn(weights, lr, value)


def _early(cfg: EarlyStoppingConfig) -> dict[str, Any]:
    return {"patience": cfg.patience, "min_delta": cfg.min_delta,
            "restore_best": cfg.restore_best}


def penalty(weights: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor | None:
    """The L1 and L2 penalty on `weights`, or None when both are off."""
    reg = Regularizers(TrainConfig(l1=l1, l2=l2, early_stopping=None))
    return reg.penalty(weights)


def freeze(model: nn.Module, names: tuple[str, ...]) -> None:
    """Keep the named layers' parameters fixed (transfer learning); unknown names refused."""
    if not names:
        return
    params = dict(model.named_parameters())
    layers = sorted({n.rsplit(".", 1)[0] for n in params})
    for name in names:
        hits = [p for n, p in params.items() if n == name or n.startswith(name + ".")]
        if not hits:
            raise UserError(f"train.freeze names layer {name!r}, which this model does not "
                            f"have; its layers are: {', '.join(layers)}.")
        for p in hits:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise UserError("train.freeze fixes every layer, so nothing would train; leave at "
                        "least one layer out of it.")

