"""The app's warm-up: torch, scikit-learn and the engine imported in a background thread
while the first page shows, so no page's script pays for them and no press waits on them.

Home draws its Showcase button before the engine is loaded and asks `engine_loaded()`;
everything here is cheap to import (no torch)."""

from __future__ import annotations

import threading

import streamlit as st

from engine.store import Store

_ENGINE = threading.Event()  # set once the engine (and torch) can be imported at no cost


@st.cache_resource
def warm_up() -> threading.Thread:
    """Start the warm-up once per server: the engine first (about 8-10 s on two slow cores,
    3 s on a fast pair), then the worker zygote, then mark runs whose worker died while
    the app was down as failed, then transformers' classes."""
    thread = threading.Thread(target=_work, name="workbench-warm-up", daemon=True)
    thread.start()
    return thread


def _work() -> None:
    try:
        import torch

        from engine import jobs, showcase  # noqa: F401  (Home's button waits on these)
        from engine.models import complexity

        complexity(torch.nn.Linear(2, 2), (2,))  # its FLOP counter loads torch._dynamo
    finally:
        _ENGINE.set()  # a failed import is raised again, as a sentence, by the page's own
    jobs.backend("local").connect()  # the worker zygote: the Showcase's runs start at once
    jobs.reap(Store())
    from engine.hf import transformers_held

    with transformers_held():  # its lazy classes, once, under the lock every page's use holds
        pass


def engine_loaded() -> bool:
    """Whether the warm-up has imported the engine, so a page can import it at no cost."""
    return _ENGINE.is_set()


def device_name() -> str:
    """The training device, once the warm-up has imported torch (never blocks a render)."""
    return _device_name() if engine_loaded() else "detecting..."


@st.cache_resource
def _device_name() -> str:
    import torch

    from engine.train import resolve_device

    device = resolve_device("auto")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
