"""Latency measurement shared by every figure the engine reports.

Warm-up calls first (allocator, caches, lazy initialization), then repeated timed calls;
the median and the 95th percentile are reported with the thread count, since a latency
figure without its thread count cannot be compared.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

THREADS = 1  # every reported latency is taken at this many threads, in every runtime
ROUNDS = 7  # rounds of `round_robin`: each figure is a median over them
REPEATS = 100  # timed calls per round, at most
BUDGET_S = 3.0  # seconds of timed calls per variant, at most: a large model gets fewer
MIN_REPEATS = 3  # calls per round, at least, so each round still has a median


def time_calls(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 100,
               sync: Callable[[], None] | None = None,
               budget_s: float | None = None) -> dict[str, float]:
    """Median and p95 wall time of `fn()` in milliseconds, and the calls timed; with
    `budget_s`, at most as many calls as fit in about that many seconds (at least
    MIN_REPEATS)."""
    if budget_s is not None:
        repeats = _repeats(fn, 1, repeats, budget_s)
        warmup = min(warmup, repeats)
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))], "calls": repeats}


def torch_latency(model: torch.nn.Module, input_shape: tuple[int, ...], *, batch: int = 1,
                  repeats: int = 100, n_threads: int = THREADS,
                  budget_s: float | None = None) -> dict[str, float]:
    """Eager PyTorch inference time of one batch on the model's device, at `n_threads`."""
    with threads(n_threads):
        figure = time_calls(torch_call(model, input_shape, batch=batch), repeats=repeats,
                            budget_s=budget_s)
    return {**figure, "batch": batch, "threads": n_threads}


def machine() -> dict[str, Any]:
    """What the figures were measured on, stored with every result."""
    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_call(model: torch.nn.Module, input_shape: tuple[int, ...], *, batch: int = 1
               ) -> Callable[[], Any]:
    """One eager inference call of `model` on a zero batch, ready for `round_robin`."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x = torch.zeros((batch, *input_shape), device=device)

    def call() -> None:
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


def round_robin(calls: dict[str, Callable[[], Any]], *, rounds: int = ROUNDS,
                repeats: int = REPEATS, n_threads: int = THREADS,
                budget_s: float = BUDGET_S) -> dict[str, dict[str, Any]]:
    """Every call timed in the same rounds, one after another within each round, so that
    frequency changes and background load hit them alike: each figure is the median over
    rounds of that round's median (ms), with its p95, call count and thread count. A ratio
    of two of these figures compares like with like; two figures taken minutes apart, or at
    different thread counts, would not. The calls per round shrink for a slow call so that
    its timing takes about `budget_s` in all (at least MIN_REPEATS a round): a 20 MB CNN is
    timed in seconds, not minutes, and its figure says how many calls it rests on."""
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    p95: dict[str, list[float]] = {name: [] for name in calls}
    with threads(n_threads):
        counts = {name: _repeats(call, rounds, repeats, budget_s)
                  for name, call in calls.items()}
        for _ in range(rounds):
            for name, call in calls.items():
                figure = time_calls(call, repeats=counts[name],
                                    warmup=min(10, counts[name]))
                per_round[name].append(figure["median_ms"])
                p95[name].append(figure["p95_ms"])
    return {name: {"median_ms": statistics.median(per_round[name]),
                   "p95_ms": statistics.median(p95[name]), "calls": rounds * counts[name],
                   "threads": n_threads} for name in calls}


def _repeats(call: Callable[[], Any], rounds: int, most: int, budget_s: float) -> int:
    """Calls per round that fit the budget, from two calls timed after one warm-up."""
    call()
    start = time.perf_counter()
    call()
    call()
    each = max((time.perf_counter() - start) / 2, 1e-9)
    return max(MIN_REPEATS, min(most, int(budget_s / (rounds * 2 * each))))
