"""Every schedule's learning-rate sequence matches its closed form, and torch's where it has one."""

from __future__ import annotations

import math

import pytest
import torch

from engine.recipe import ScheduleConfig
from engine.schedules import SCHEDULES, LRSchedule, preview

BASE, EPOCHS = 0.1, 40


def torch_rates(make, epochs=EPOCHS):
    """The rate torch's own scheduler uses in each epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    sched = make(opt)
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def ours(name, **options):
    return preview(ScheduleConfig(name=name, options=options), BASE, EPOCHS)


def test_constant():
    assert ours("constant") == [BASE] * EPOCHS


def test_step():
    assert ours("step", step_size=7, gamma=0.5) == pytest.approx(
        [BASE * 0.5 ** (e // 7) for e in range(EPOCHS)])
    assert ours("step", step_size=7, gamma=0.5) == pytest.approx(torch_rates(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)))


def test_exponential():
    assert ours("exponential", gamma=0.9) == pytest.approx(
        [BASE * 0.9 ** e for e in range(EPOCHS)])
    assert ours("exponential", gamma=0.9) == pytest.approx(torch_rates(
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)))


def test_cosine():
    expected = [0.001 + (BASE - 0.001) * (1 + math.cos(math.pi * e / EPOCHS)) / 2
                for e in range(EPOCHS)]
    assert ours("cosine", min_lr=0.001) == pytest.approx(expected)
    assert ours("cosine", min_lr=0.001) == pytest.approx(torch_rates(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS, eta_min=0.001)))


def test_cosine_restarts():
    rates = ours("cosine_restarts", period=5, period_mult=2, min_lr=0.0)
    starts = [0, 5, 15, 35]  # periods of 5, 10, 20, ...
    for s in starts:
        assert rates[s] == pytest.approx(BASE)
    # inside the second period (epochs 5..14): t = e - 5 of 10
    assert rates[9] == pytest.approx(BASE * (1 + math.cos(math.pi * 4 / 10)) / 2)
    assert rates == pytest.approx(torch_rates(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2)))


def test_onecycle():
    rates = ours("onecycle", pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    assert rates[0] == pytest.approx(BASE / 25)
    assert max(rates) == pytest.approx(BASE)
    assert rates[-1] == pytest.approx(BASE / 25 / 1e4)
    assert rates == pytest.approx(torch_rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=BASE, total_steps=EPOCHS, pct_start=0.3, div_factor=25.0,
        final_div_factor=1e4)))


def test_plateau_matches_torch():
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7] * 3
    sched = LRSchedule(ScheduleConfig(name="plateau", options={"patience": 2, "factor": 0.5,
                                                               "cooldown": 1}), BASE, 40)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5, cooldown=1)
    for e, loss in enumerate(losses):
        assert sched.lr(e) == pytest.approx(opt.param_groups[0]["lr"]), e
        sched.observe(loss)
        ref.step(loss)
    assert sched.lr(len(losses)) < BASE / 4


def test_linear_warmup_on_any_schedule():
    for name in SCHEDULES.names():
        cfg = ScheduleConfig(name=name, warmup_epochs=4, warmup_start=0.2)
        rates = preview(cfg, BASE, EPOCHS)
        assert rates[:4] == pytest.approx([BASE * (0.2 + 0.8 * e / 4) for e in range(4)])
        # after the warm-up the schedule starts from its own epoch 0 over the rest
        inner = preview(ScheduleConfig(name=name), BASE, EPOCHS - 4)
        assert rates[4:] == pytest.approx(inner), name


def test_every_schedule_is_positive_and_bounded():
    for entry in SCHEDULES:
        rates = preview(ScheduleConfig(name=entry.name), BASE, EPOCHS)
        assert len(rates) == EPOCHS
        assert all(0 <= r <= BASE + 1e-12 for r in rates), entry.name
