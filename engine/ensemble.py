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
from typing import Any

import torch
from torch import nn

from engine.data import DataBundle
from engine.recipe import Recipe
from engine.sections import resolve_sections
from engine.stack import Member
from engine.stack_train import train_stacked
from engine.train import TrainResult, fit_fresh, to_tensors

BATCHED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
PER_MEMBER = ("lr", "weight_decay", "l1", "l2", "epochs")  # train keys members may vary
_STACK_FLOATS = 2 ** 26  # members per stack are capped so a step's tensors stay ~256 MB

__all__ = ["BATCHED_OPTIMIZERS", "PER_MEMBER", "EnsembleResult", "Member", "blocker",
           "fit_members"]


@dataclasses.dataclass
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
    return resolve_sections(Recipe.from_dict(raw))


def _chunks(ids: list[int], recipe: Recipe, data: DataBundle,
            n_rows: list[int]) -> list[list[int]]:
    """Split a stack so one step's inputs, activations and state stay within budget."""
    cfg = recipe.train
    n = max(n_rows[i] for i in ids)
    batch = n if cfg.batch_size == "full" else min(int(cfg.batch_size), n)
    n_out = data.n_outputs
    hidden = list(recipe.model.hidden) if recipe.model.source == "builtin:mlp" else []
    dims = [math.prod(data.input_shape), *hidden, n_out]
    params = sum(a * b for a, b in itertools.pairwise(dims))
    rows = max(batch, len(data.y_val), n if data.task != "classification" else 0)
    per_member = rows * (dims[0] + 3 * sum(dims[1:])) + 6 * params
    size = max(1, _STACK_FLOATS // per_member)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _sequential(recipe: Recipe, data: DataBundle, m: Member,
                device: torch.device) -> tuple[nn.Module, TrainResult]:
    part = data
    if m.val_idx is not None:  # its own held-out rows, as a k-fold trains each fold
        part = dataclasses.replace(part, X_val=data.X_train[m.val_idx],
                                   y_val=data.y_train[m.val_idx])
    return fit_fresh(recipe, part, m.idx, seed=m.seed, device=device)


