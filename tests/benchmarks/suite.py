"""The performance suite: `python -m engine bench [--quick]`, or this file run directly.

Prints Markdown tables headed by the machine's description:

1. epoch time of the digits MLP (64-128-64-10, Adam, batch 64): the engine's loop, the
   textbook DataLoader loop and skorch's NeuralNetClassifier (bench_epoch.py);
2. 20 bootstrap rounds of that MLP: the batched ensemble against one model after another
   (engine/ensemble.py), and, per training step, batched products against torch.func.vmap;
3. inference at batch 1 and 256: PyTorch eager, ONNX Runtime float32 and int8
   (bench_deploy.py);
4. the app: AppTest cold start and page switches, and a real `streamlit run` timed to its
   health answer, to `/` answering, and (with Playwright and Chromium) to the first page's
   heading in a browser, plus page switches there;
5. real architectures (ResNet-18, MobileNetV2) in ONNX Runtime: float32, static int8 and
   structured 50% (bench_models.py);
6. a pretrained CNN (EfficientNet-Lite0 with its ImageNet weights, as an uploaded .pt2)
   through every technique, label-free: agreement, size, speed, run time and peak memory
   (bench_pretrained.py; not in the default set: it takes about an hour on two cores).
7. auto-compress against the fixed presets on the same baselines: the smallest digits MLP
   within 1 point, the fastest built-in CNN within 1 point (bench_autocompress.py; not in
   the default set: `--only autocompress`).
8. text models: a sentence-transformers folder of MiniLM-L6's shape in ONNX Runtime,
   float32 against dynamic int8 at batch 1 x 128 tokens, and distillation to half the
   layers (bench_text.py; not in the default set: `--only text`).

Each figure is a median over alternating repeats; the thread count is set on purpose
(`--threads`, default 1: on a shared 2-core machine a second thread mostly spin-waits).
Not a unit test: the figures depend on the machine and go in the README by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import torch  # noqa: E402

from engine.latency import machine  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def table(header: list[str], rows: list[list[str]]) -> str:
    right = ["---:" if i else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _median_epoch(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times) * 1e3


# --- 1. epoch time ------------------------------------------------------------------------

def epoch_section(epochs: int, repeats: int, device: torch.device) -> str:
    from bench_epoch import engine_epochs, recipe_for, skorch_epochs, textbook_epochs

    recipe = recipe_for(64, epochs)
    runs: dict[str, list[float]] = {"engine": [], "textbook": [], "skorch": []}
    acc: dict[str, float] = {}
    fns = {"engine": engine_epochs, "textbook": textbook_epochs, "skorch": skorch_epochs}
    for _ in range(repeats):  # alternate, so background load hits all three alike
        for name, fn in fns.items():
            times, acc[name] = fn(recipe, device)
            runs[name].append(_median_epoch(times))
    ms = {k: statistics.median(v) for k, v in runs.items()}
    rows = [[name, f"{ms[name]:.1f}", f"{ms[name] / ms['engine']:.2f}x", f"{acc[name]:.3f}"]
            for name in ("engine", "textbook", "skorch")]
    return (f"**1. Epoch time**: digits MLP 64-128-64-10, Adam lr 1e-3, batch 64, {epochs} "
            f"epochs, median epoch (first dropped) of {repeats} alternating run(s). The "
            f"engine and the textbook loop end each epoch with a validation pass; skorch runs "
            f"with train_split=None (no validation) and its default callbacks.\n\n"
            + table(["loop", "ms/epoch", "time vs engine", "val acc"], rows))


# --- 2. batched ensemble ------------------------------------------------------------------

def ensemble_section(epochs: int, repeats: int, device: torch.device) -> str:
    from engine.data import load_data
    from engine.diagnostics.bias_variance import bootstrap_samples
    from engine.ensemble import Member, fit_members
    from engine.runner import resolve

    recipe = resolve({"data": {"source": "builtin:digits"},
                               "model": {"source": "builtin:mlp", "hidden": [128, 64]},
                               "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64,
                                         "epochs": epochs, "early_stopping": None}})
    data = load_data(recipe.data, seed=0)
    members = [Member(idx=idx, seed=r) for r, idx in
               enumerate(bootstrap_samples(len(data.y_train), 20, 0))]
    suite_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({suite_threads, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        secs: dict[bool, list[float]] = {True: [], False: []}
        acc: dict[bool, float] = {}
        for _ in range(repeats):
            for batched in (True, False):
                start = time.perf_counter()
                out = fit_members(recipe, data, members, device=device, batched=batched)
                secs[batched].append(time.perf_counter() - start)
                acc[batched] = statistics.mean(f.history["val_accuracy"][-1]
                                               for f in out.fits)
        b, s = statistics.median(secs[True]), statistics.median(secs[False])
        rows += [[str(threads), "batched ensemble (baddbmm, fused Adam)", f"{b:.2f}",
                  f"{s / b:.2f}x", f"{acc[True]:.4f}"],
                 [str(threads), "sequential (engine.train x 20)", f"{s:.2f}", "1.00x",
                  f"{acc[False]:.4f}"]]
    torch.set_num_threads(suite_threads)
    step = step_section(device)
    return (f"**2. 20 bootstrap rounds** of the digits MLP (Adam, batch 64, {epochs} epochs, "
            f"validation pass every epoch), median of {repeats} alternating run(s), at the "
            f"suite's thread count and at one thread per core:\n\n"
            + table(["threads", "training", "seconds", "speedup", "mean val acc"], rows)
            + "\n\n" + step)


def step_section(device: torch.device, K: int = 20, batch: int = 64, steps: int = 60) -> str:
    """One forward and backward pass of K stacked MLPs: baddbmm against vmap."""
    from torch.func import functional_call, stack_module_state, vmap

    from engine.models import build_model
    from engine.recipe import ModelConfig
    from engine.stack import Stack

    cfg = ModelConfig(hidden=(128, 64))
    nets = [build_model(cfg, (1, 8, 8), 10, seed=k).to(device) for k in range(K)]
    x = torch.randn(K, batch, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (K, batch), device=device)
    stack = Stack(nets, device)
    params, buffers = stack_module_state(nets)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = nets[0]

    def one(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    def bmm_step() -> None:
        out = stack.forward(x, training=True)
        torch.nn.functional.cross_entropy(out.reshape(K * batch, -1), y.reshape(-1)).backward()

    def vmap_step() -> None:
        out = vmap(one)(params, buffers, x)
        torch.nn.functional.cross_entropy(out.reshape(K * batch, -1), y.reshape(-1)).backward()

    def loop_step() -> None:
        for k, net in enumerate(nets):
            torch.nn.functional.cross_entropy(net(x[k]), y[k]).backward()

    ms = {}
    for name, fn in (("baddbmm on stacked weights", bmm_step), ("torch.func.vmap", vmap_step),
                     ("a Python loop over 20 models", loop_step)):
        rounds = []
        for _ in range(5):
            for _ in range(3):
                fn()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            rounds.append((time.perf_counter() - start) / steps * 1e3)
        ms[name] = statistics.median(rounds)
    first = ms["baddbmm on stacked weights"]
    rows = [[k, f"{v:.2f}", f"{v / first:.2f}x"] for k, v in ms.items()]
    return (f"Forward + backward of {K} stacked MLPs at batch {batch}, median ms per step:\n\n"
            + table(["method", "ms/step", "time vs baddbmm"], rows))


# --- 3. inference -------------------------------------------------------------------------

def inference_section(quick: bool) -> str:
    from bench_deploy import measure

    threads = torch.get_num_threads()
    rows = measure(("mlp",) if quick else ("mlp", "cnn"), epochs=3 if quick else 15)
    torch.set_num_threads(threads)
    body = [[r["model"].upper(), r["runtime"], f"{r['accuracy']:.3f}", f"{r['p50_ms']:.4f}",
             f"{r['p95_ms']:.4f}", f"{r['rows_per_s']:,.0f}", f"{r['p50_vs_eager']:.2f}x",
             f"{r['rows_vs_eager']:.2f}x"] for r in rows]
    return ("**3. Inference** (digits, one thread for every runtime, ONNX files with their "
            "preprocessing inside; sessions built once and reused):\n\n"
            + table(["model", "runtime", "test acc", "p50 ms @1", "p95 ms @1", "rows/s @256",
                     "p50 vs eager", "rows/s vs eager"], body))


def models_section(quick: bool) -> str:
    from bench_models import markdown, measure

    threads = torch.get_num_threads()
    rows = measure(quick)
    torch.set_num_threads(threads)
    return ("**5. Real architectures** (ResNet-18 and MobileNetV2 from transformers configs, "
            "float32 vs static int8 vs structured 50%, bench_models.py):\n\n"
            + markdown(rows, quick))


def autocompress_section(quick: bool) -> str:
    from bench_autocompress import autocompress_section as section

    return ("**7. Auto-compress against the fixed presets** (same baselines, "
            "bench_autocompress.py):\n\n" + section(quick))


def text_section(quick: bool, threads: int) -> str:
    from bench_text import text_section as section

    return ("**8. Text models** (a sentence-transformers folder of MiniLM-L6's shape, built "
            "offline with random weights; ONNX Runtime float32 vs dynamic int8, and "
            "distillation to half the layers; bench_text.py):\n\n" + section(quick, threads))


def pretrained_section(quick: bool) -> str:
    from bench_pretrained import markdown, measure

    return ("**6. A pretrained CNN, label-free** (EfficientNet-Lite0, ImageNet weights, "
            "bench_pretrained.py):\n\n" + markdown(measure(quick)))


# --- 4. the app ---------------------------------------------------------------------------

APPTEST = textwrap.dedent("""
    import json, statistics, sys, time
    t0 = time.perf_counter()
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file("app.py", default_timeout=120)
    at.run()
    cold = time.perf_counter() - t0
    assert not at.exception, at.exception
    pages = ["views/data_model.py", "views/train.py", "views/diagnose.py", "views/compare.py",
             "views/runs.py", "views/home.py"]
    first, again = [], []
    for rnd in (first, again):
        for p in pages:
            s = time.perf_counter()
            at.switch_page(p).run()
            rnd.append(time.perf_counter() - s)
            assert not at.exception, (p, at.exception)
    print(json.dumps({"cold": cold, "first": first, "again": again, "pages": pages}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError:
        return None


def app_section() -> str:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WORKBENCH_STORE": f"sqlite:///{tmp}/store.db",
               "WORKBENCH_ARTIFACTS": f"{tmp}/artifacts", "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", APPTEST], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"**4. App**: the AppTest run failed:\n\n```\n{done.stderr[-1500:]}\n```"
        at = json.loads(done.stdout.strip().splitlines()[-1])
        real = _real_start(env)
    names = [Path(p).stem for p in at["pages"]]
    rows = [["AppTest: fresh process to the first page rendered (imports included)",
             f"{at['cold']:.2f}"]]
    rows += [[f"AppTest: switch to {n} (first visit / again)", f"{a:.2f} / {b:.2f}"]
             for n, a, b in zip(names, at["first"], at["again"], strict=True)]
    rows += [[k, v] for k, v in real]
    worst = max(at["first"])
    return ("**4. App** (`streamlit run app.py --server.headless true`, an empty run store):"
            "\n\n" + table(["what", "seconds"], rows)
            + f"\n\nAppTest page switches: median {statistics.median(at['again']):.2f} s, "
              f"slowest first visit {worst:.2f} s.")


def _real_start(env: dict[str, str]) -> list[tuple[str, str]]:
    """Start `streamlit run` and time it; the browser (when there is one) is started first,
    as a user's is already open, so its own start-up is not counted."""
    with contextlib.ExitStack() as stack:
        page = _open_browser(stack)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(_stop, proc)
        out: list[tuple[str, str]] = []
        health = index = None
        deadline = start + 120
        while (health is None or index is None) and time.perf_counter() < deadline:
            now = time.perf_counter() - start
            if health is None and _get(f"{url}/_stcore/health") == 200:
                health = now
            if index is None and _get(url + "/") == 200:
                index = now
            time.sleep(0.05)
        out.append(("`streamlit run`: /_stcore/health answers", f"{health:.2f}"
                    if health is not None else "no answer"))
        out.append(("`streamlit run`: GET / returns 200", f"{index:.2f}"
                    if index is not None else "no answer"))
        if isinstance(page, str):
            return [*out, ("browser timings", page)]
        out += _browser(page, url, start, env["WORKBENCH_STORE"])
    return out


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    if proc.poll() is None:
        proc.kill()


def _open_browser(stack: contextlib.ExitStack) -> object:
    """A Chromium page, or a sentence saying why there is none."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: Playwright is not installed"
    if not Path(chromium).exists():
        return "skipped: Chromium is not installed"
    p = stack.enter_context(sync_playwright())
    browser = p.chromium.launch(executable_path=chromium, args=ARGS)
    stack.callback(browser.close)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    return page


def _settle(page: object, quiet_s: float = 1.0) -> None:
    """Wait until the page's script has finished (Streamlit's "Running" status widget is
    gone) and its charts had `quiet_s` to draw: a click sent while the previous page still
    draws Plotly charts waits for them on a 2-core machine, which times that page, not the
    switch."""
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    page.wait_for_timeout(quiet_s * 1000)


def _cancel_all(store: str) -> None:
    """Cancel every run the press started (workers killed at once)."""
    from engine import jobs
    from engine.store import Store

    runs = Store(store)
    for run in runs.active_runs():
        jobs.cancel(run["id"], store=runs, grace_s=0)


def _browser(page: object, url: str, start: float, store: str) -> list[tuple[str, str]]:
    from playwright.sync_api import expect

    rows = []
    page.goto(url)
    expect(page.get_by_role("heading", level=1).first).to_be_visible(timeout=120_000)
    rows.append(("`streamlit run` to the first page's heading in Chromium (first render)",
                 f"{time.perf_counter() - start:.2f}"))
    expect(page.get_by_role("button", name="Showcase")).to_be_enabled(timeout=120_000)
    rows.append(("`streamlit run` to Home's Showcase button drawn and enabled",
                 f"{time.perf_counter() - start:.2f}"))
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    rows.append(("`streamlit run` to Home's script finished (a press is answered)",
                 f"{time.perf_counter() - start:.2f}"))
    # a press at once, while the engine may still be loading: kept, then carried out
    page.get_by_role("button", name="Showcase").click()
    expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(
        timeout=120_000)
    rows.append(("`streamlit run` to Compare's heading, Showcase pressed at once",
                 f"{time.perf_counter() - start:.2f}"))
    _cancel_all(store)  # the page switches below are timed on a quiet machine
    for visit in ("first visit", "again"):
        for name in ("Train", "Data & Model", "Diagnose", "Runs"):
            _settle(page)  # a person clicks once the page is drawn, not mid-draw
            s = time.perf_counter()
            page.get_by_role("link", name=name, exact=True).click()
            expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible(
                timeout=60_000)
            rows.append((f"Chromium: click {name} to its heading ({visit})",
                         f"{time.perf_counter() - s:.2f}"))
    return rows


# --- the suite ----------------------------------------------------------------------------

def run(quick: bool = False, threads: int = 1, sections: tuple[str, ...] = (
        "epoch", "ensemble", "inference", "app")) -> None:
    """Print the suite's tables for the chosen sections."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine()
    import onnxruntime
    import skorch
    import streamlit

    print(f"machine: {info['processor']}, {os.cpu_count()} CPU cores, {info['platform']}, "
          f"Python {info['python']}, torch {info['torch']}, onnxruntime "
          f"{onnxruntime.__version__}, skorch {skorch.__version__}, streamlit "
          f"{streamlit.__version__}; {threads} torch thread(s); training device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else " (no GPU)")
          + f"; {'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d')}\n")
    parts = {
        "epoch": lambda: epoch_section(5 if quick else 12, 1 if quick else 5, device),
        "ensemble": lambda: ensemble_section(5 if quick else 20, 1 if quick else 3, device),
        "inference": lambda: inference_section(quick),
        "app": app_section,
        "models": lambda: models_section(quick),
        "pretrained": lambda: pretrained_section(quick),
        "autocompress": lambda: autocompress_section(quick),
        "text": lambda: text_section(quick, threads),
    }
    for name in sections:
        start = time.perf_counter()
        print(parts[name]())
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", nargs="+",
                        choices=["epoch", "ensemble", "inference", "app", "models",
                                 "pretrained", "autocompress", "text"],
                        help="run only these sections")
    args = parser.parse_args(argv)
    run(args.quick, args.threads, tuple(args.only or ("epoch", "ensemble", "inference",
                                                       "app", "models")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
