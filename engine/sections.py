"""The data, model and train sections resolved against the registries that hold them.

The recipe's schema (`engine.recipe`) knows no registry; here each section's names are
looked up (a dataset, an architecture, a schedule, an optimizer) and their own settings
checked with the registry's defaults filled in (a schedule's `gamma`, an optimizer's
default learning rate). `engine.runner.resolve` adds the compression chain and the tune
section on top; a search resolves each trial's sections here. Idempotent: a resolved
section resolves to itself.
"""

from __future__ import annotations

import dataclasses

from engine.data import DATASETS
from engine.errors import UserError
from engine.models import MODELS
from engine.optimizers import OPTIMIZERS
from engine.recipe import DataConfig, ModelConfig, Recipe, ScheduleConfig, TrainConfig
from engine.schedules import SCHEDULES


def resolve_sections(recipe: Recipe) -> Recipe:
    """`recipe` with its data, model and train sections checked and their defaults filled."""
    return dataclasses.replace(recipe, data=resolve_data(recipe.data),
                               model=resolve_model(recipe.model),
                               train=resolve_train(recipe.train))


def resolve_data(cfg: DataConfig) -> DataConfig:
    """A built-in dataset's own settings (`data.params`) checked and filled."""
    if not cfg.source.startswith("builtin:"):
        return cfg
    entry = DATASETS.get(cfg.source.removeprefix("builtin:"))
    return dataclasses.replace(cfg, params=entry.resolve(cfg.params, "data.params"))


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """The built-in architecture (or the one a state_dict belongs to) must exist."""
    if cfg.source.startswith("builtin:"):
        MODELS.get(cfg.source.removeprefix("builtin:"))
    if cfg.architecture is not None:
        MODELS.get(cfg.architecture)
    return cfg


def resolve_schedule(cfg: ScheduleConfig | None) -> ScheduleConfig | None:
    if cfg is None:
        return None
    entry = SCHEDULES.get(cfg.name)
    return dataclasses.replace(cfg, options=entry.resolve(cfg.options, "train.schedule"))


def resolve_train(cfg: TrainConfig) -> TrainConfig:
    """The optimizer's options filled (the older `train.momentum` moved into them), its
    default learning rate where `lr` is null, and the schedule's settings."""
    entry = OPTIMIZERS.get(cfg.optimizer)
    options = dict(cfg.optimizer_options)
    if cfg.momentum is not None and entry.extra.get("train_momentum"):
        options["momentum"] = cfg.momentum  # the explicit older key wins, then is cleared
    options = entry.resolve(options, "train.optimizer_options")
    lr = entry.extra["default_lr"] if cfg.lr is None else cfg.lr
    if cfg.precision == "bf16" and entry.extra.get("closure"):
        raise UserError(f"train.precision bf16 does not work with {cfg.optimizer}, whose "
                        f"line search needs float32 losses; set it to \"auto\" or \"fp32\".")
    return dataclasses.replace(cfg, optimizer_options=options, lr=lr, momentum=None,
                               schedule=resolve_schedule(cfg.schedule))
