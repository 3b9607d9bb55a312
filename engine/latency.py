"""Latency measurement shared by every figure the engine reports.

Warm-up calls first (allocator, caches, lazy initialization), then repeated timed calls;
the median and the 95th percentile are reported with the thread count, since a latency
figure without its thread count cannot be compared.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def time_calls(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 100,
               sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and p95 wall time of `fn()` in milliseconds."""
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
            "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))]}


def torch_latency(model: torch.nn.Module, input_shape: tuple[int, ...], *, batch: int = 1,
                  repeats: int = 100) -> dict[str, float]:
    """Eager PyTorch inference time of one batch on the model's device."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x = torch.zeros((batch, *input_shape), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def call() -> None:
        with torch.inference_mode():
            model(x)

    return {**time_calls(call, repeats=repeats, sync=sync), "batch": batch,
            "threads": torch.get_num_threads()}


def machine() -> dict[str, Any]:
    """What the figures were measured on, stored with every result."""
    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def paired_latency(model: torch.nn.Module, reference: torch.nn.Module,
                   input_shape: tuple[int, ...], *, rounds: int = 7,
                   repeats: int = 100) -> tuple[float, float]:
    """Median batch-1 latency (ms) of `model` and of `reference`, measured in alternating
    rounds so that frequency changes and background load hit both alike: a speedup from
    two figures taken minutes apart would be mostly noise at these sub-millisecond scales."""
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(torch_latency(reference, input_shape, repeats=repeats)["median_ms"])
        ours.append(torch_latency(model, input_shape, repeats=repeats)["median_ms"])
    return statistics.median(ours), statistics.median(theirs)
