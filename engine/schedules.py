"""Learning-rate schedules: pure functions of the epoch, plus one that watches the loss.

Each schedule gives the learning rate used during epoch `e` (0-based) of `epochs`, from
the base rate, in closed form (as nanoGPT's `get_lr`). Any of them can start with a linear
warm-up; the schedule then runs over the epochs that remain. `plateau` is the one schedule
with state: it lowers the rate when the validation loss stops improving.
The rate changes once per epoch, so the preview the app draws is exactly what runs.
"""

from __future__ import annotations

import math
from typing import Any

from engine.recipe import ScheduleConfig
from engine.registry import Param, Registry

SCHEDULES = Registry("schedules", "schedule", "Learning-rate schedules, applied per epoch.")


@SCHEDULES.register("constant", "The same learning rate every epoch.")
def constant(e: int, base: float, epochs: int) -> float:
    return base


@SCHEDULES.register("step", "Multiply the rate by gamma every step_size epochs.", params=(
    Param("step_size", "int", 10, "epochs between drops", low=1),
    Param("gamma", "float", 0.1, "factor applied at each drop", low=0.0, high=1.0),
))
def step(e: int, base: float, epochs: int, *, step_size: int, gamma: float) -> float:
    return base * gamma ** (e // step_size)


@SCHEDULES.register("exponential", "Multiply the rate by gamma after every epoch.", params=(
    Param("gamma", "float", 0.95, "factor applied each epoch", low=0.0, high=1.0),
))
def exponential(e: int, base: float, epochs: int, *, gamma: float) -> float:
    return base * gamma ** e


@SCHEDULES.register("cosine", "Half a cosine from the base rate down to min_lr over the run.",
                    params=(Param("min_lr", "float", 0.0, "rate at the end", low=0.0),))
def cosine(e: int, base: float, epochs: int, *, min_lr: float) -> float:
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * e / epochs)) / 2


@SCHEDULES.register("cosine_restarts", "Cosine annealing with warm restarts (SGDR): a cosine "
                    "over period epochs, restarted with periods growing by period_mult.",
                    params=(
    Param("period", "int", 10, "epochs of the first cosine", low=1),
    Param("period_mult", "int", 1, "each period is this many times longer", low=1),
    Param("min_lr", "float", 0.0, "rate at the end of each period", low=0.0),
))
def cosine_restarts(e: int, base: float, epochs: int, *, period: int, period_mult: int,
                    min_lr: float) -> float:
    t, length = e, period
    while t >= length:  # find the position inside the current period
        t -= length
        length *= period_mult
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * t / length)) / 2


@SCHEDULES.register("onecycle", "One cycle (Smith): rise from base/div_factor to the base rate "
                    "over pct_start of the run, then a cosine down to base/(div_factor*"
                    "final_div_factor).", params=(
    Param("pct_start", "float", 0.3, "fraction of the run spent rising", low=0.0, high=1.0),
    Param("div_factor", "float", 25.0, "base rate / starting rate", low=1.0),
    Param("final_div_factor", "float", 1e4, "starting rate / final rate", low=1.0),
))
def onecycle(e: int, base: float, epochs: int, *, pct_start: float, div_factor: float,
             final_div_factor: float) -> float:
    start = base / div_factor
    end = start / final_div_factor
    peak = float(pct_start * epochs) - 1  # as torch.optim.lr_scheduler.OneCycleLR
    last = epochs - 1
    if e <= peak:
        return _cos_between(start, base, e / peak if peak > 0 else 1.0)
    return _cos_between(base, end, (e - peak) / (last - peak) if last > peak else 1.0)


def _cos_between(a: float, b: float, fraction: float) -> float:
    return b + (a - b) * (1 + math.cos(math.pi * fraction)) / 2


@SCHEDULES.register("plateau", "Multiply the rate by factor when the validation loss has not "
                    "improved for patience epochs.", params=(
    Param("factor", "float", 0.1, "factor applied at each drop", low=0.0, high=1.0),
    Param("patience", "int", 5, "epochs without improvement before a drop", low=0),
    Param("threshold", "float", 1e-4, "relative improvement that counts", low=0.0),
    Param("cooldown", "int", 0, "epochs to wait after a drop", low=0),
    Param("min_lr", "float", 0.0, "the rate never goes below this", low=0.0),
), stateful=True)
def plateau(e: int, base: float, epochs: int, **_: Any) -> float:
    return base  # the drops come from LRSchedule.observe


class LRSchedule:
    """The rate for each epoch: warm-up, then the chosen schedule (`None` is constant)."""

    def __init__(self, cfg: ScheduleConfig | None, base_lr: float, epochs: int) -> None:
        self.cfg = cfg or ScheduleConfig()
        self.entry = SCHEDULES.get(self.cfg.name)
        self.options = self.entry.resolve(self.cfg.options, "train.schedule")
        self.base_lr = base_lr
        self.epochs = epochs
        # plateau's state, as torch.optim.lr_scheduler.ReduceLROnPlateau (mode min, rel)
        self._scale = 1.0
        self._best = math.inf
        self._bad = 0
        self._cooldown = 0

    def lr(self, e: int) -> float:
        warm = self.cfg.warmup_epochs
        if e < warm:
            start = self.cfg.warmup_start
            return self.base_lr * (start + (1 - start) * e / warm)
        rate = self.entry.fn(e - warm, self.base_lr, max(1, self.epochs - warm), **self.options)
        if self.cfg.name == "plateau":
            rate = max(rate * self._scale, self.options["min_lr"])
        return rate

    def observe(self, val_loss: float) -> None:
        """Tell the schedule the epoch's validation loss; only `plateau` uses it."""
        if self.cfg.name != "plateau":
            return
        opts = self.options
        if val_loss < self._best * (1 - opts["threshold"]):
            self._best, self._bad = val_loss, 0
        else:
            self._bad += 1
        if self._cooldown > 0:
            self._cooldown -= 1
            self._bad = 0
        if self._bad > opts["patience"]:
            self._scale *= opts["factor"]
            self._cooldown, self._bad = opts["cooldown"], 0


def preview(cfg: ScheduleConfig | None, base_lr: float, epochs: int) -> list[float]:
    """The rate of every epoch, as the app plots it before a run (plateau: no drops yet)."""
    schedule = LRSchedule(cfg, base_lr, epochs)
    return [schedule.lr(e) for e in range(epochs)]
