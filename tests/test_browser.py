"""A real browser on the real app: pick data, start a run, watch its curve, find it in Runs.

Starts `streamlit run app.py` on a free localhost port with its own store, drives Debian's
Chromium through Playwright, and saves screenshots under tests/artifacts/ (the README's
tour uses them). Skips on a machine without Chromium or Playwright, but never under CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.store import Store

pytestmark = pytest.mark.slow  # real servers, processes or a browser: the full tier

ROOT = Path(__file__).parent.parent
SHOTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Chromium is not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -r requirements.txt)"
    return None


missing = _missing()
if missing and os.environ.get("CI") != "true":
    pytest.skip(missing, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    assert missing is None, missing  # under CI a missing piece fails the run
    port = free_port()
    env = {**os.environ, "WORKBENCH_STORE": f"sqlite:///{tmp_path}/store.db",
           "WORKBENCH_ARTIFACTS": str(tmp_path / "artifacts")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=(tmp_path / "server.log").open("wb"),
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                out = (tmp_path / "server.log").read_text(errors="replace")
                pytest.fail(f"streamlit did not start: {out[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def browser_page(app_url: str) -> Iterator[Any]:
    """Chromium on the app's first page, closed afterwards; timeouts sized for a 2-core
    CI machine, which loads data and torch slowly."""
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.set_default_timeout(60_000)
            page.goto(app_url)
            yield page
        finally:
            browser.close()


def pick(page: Any, box: str, option: str | re.Pattern) -> None:
    """Open the dropdown `box` and choose `option`, trying again when a rerun redrew the box
    under the click: the list then never showed (CI saw it once), or closed between showing
    and the click (a text model's Compress page, once)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    choice = page.get_by_role("option", name=option, exact=isinstance(option, str))
    for attempt in range(4):
        page.get_by_role("combobox", name=box, exact=True).click()
        try:
            choice.click(timeout=5_000)
            return
        except PlaywrightTimeout:
            if attempt == 3:
                raise
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)


def test_pick_data_run_watch_and_find_the_run(app_url, tmp_path):
    from playwright.sync_api import expect

    with browser_page(app_url) as page:

        # Home opens first; Data & Model shows the built-in pair; pick the dataset explicitly
        expect(page.get_by_role("heading", name="Model optimization workbench")).to_be_visible()
        page.get_by_role("link", name="Data & Model", exact=True).click()
        expect(page.get_by_role("heading", name="Data & Model")).to_be_visible()
        pick(page, "Built-in dataset", "digits")
        expect(page.get_by_text("input shape")).to_be_visible()
        expect(page.locator(".js-plotly-plot").first).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "data_model.png", full_page=True)

        # Train: a short run, then its curves grow in the live section
        page.get_by_role("link", name="Train", exact=True).click()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
        epochs = page.get_by_role("spinbutton", name="Epochs", exact=True)
        epochs.fill("8")
        epochs.press("Enter")
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Run", exact=True).click()
        # the Live section, not just any "epoch" (the warm-up box's label has one): the run
        # was submitted and remembered before the reload below
        expect(page.get_by_role("heading", name="Live")).to_be_visible(timeout=60_000)
        # a reload mid-run (the URL carries ?ws=) keeps the settings, the run and its view
        assert "ws=" in page.url
        page.reload()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
        expect(page.get_by_role("spinbutton", name="Epochs", exact=True)).to_have_value("8")
        expect(page.get_by_text("done · epoch 8 of 8")).to_be_visible(timeout=120_000)
        live = page.locator(".js-plotly-plot")
        expect(live.nth(1)).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "train.png", full_page=True)

        # Runs: the run is listed
        page.get_by_role("link", name="Runs", exact=True).click()
        expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
        # the table is drawn on a canvas; its cells live on in an accessible grid
        cells = page.locator("[data-testid=stDataFrame] td[role=gridcell]")
        expect(cells.filter(has_text="mlp on digits · adam").first).to_be_attached()
        expect(cells.filter(has_text="done").first).to_be_attached()
        # open it: tick the row's selection box, drawn at the left edge of the first row
        box = page.locator("[data-testid=stDataFrame]").first.bounding_box()
        page.mouse.click(box["x"] + 14, box["y"] + 35 + 18)
        expect(page.get_by_role("heading", name="mlp on digits · adam · done")).to_be_visible()
        expect(page.get_by_role("button", name="Model: baseline (bundle ZIP)")).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "runs.png", full_page=True)
        # Delete asks first; keeping it leaves the run where it was
        page.get_by_role("button", name="Delete run", exact=True).click()
        expect(page.get_by_text("This cannot be undone.")).to_be_visible()
        page.get_by_role("button", name="Keep it", exact=True).click()
        expect(page.get_by_text("This cannot be undone.")).to_have_count(0)
        expect(page.get_by_role("heading", name="mlp on digits · adam · done")).to_be_visible()

        # Diagnose: curves, decomposition and the verdict for the same model and data
        page.get_by_role("link", name="Diagnose", exact=True).click()
        expect(page.get_by_role("heading", name="Diagnose", exact=True)).to_be_visible()
        rounds = page.get_by_role("spinbutton", name="Bootstrap rounds")
        rounds.fill("5")
        rounds.press("Enter")
        page.wait_for_timeout(800)
        page.get_by_role("button", name="Diagnose", exact=True).click()
        expect(page.get_by_text("What to try next")).to_be_visible(timeout=240_000)
        expect(page.get_by_text("learning curve", exact=True)).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "diagnose.png", full_page=True)

        # Compress this run's model (its bundle): Deep Compression, then static int8, with
        # the sensitivity heatmap; sharing must really run on the reloaded model
        page.get_by_role("link", name="Compress", exact=True).click()
        expect(page.get_by_role("heading", name="Compress", exact=True)).to_be_visible()
        page.get_by_text("A finished run's model", exact=True).click()
        pick(page, "Run", re.compile(r"^mlp on digits · adam"))
        page.get_by_role("button", name="Deep Compression preset").click()
        expect(page.locator("code", has_text="deep_compression").first).to_be_visible()
        pick(page, "Technique", "quantize")
        page.get_by_text("quantize settings", exact=True).click()
        pick(page, "method", "static_int8")
        page.get_by_role("button", name="Add step").click()
        expect(page.locator("code", has_text="quantize static_int8").first).to_be_visible()
        page.get_by_role("button", name="Run chain").click()
        expect(page.get_by_text("· done · ")).to_be_visible(timeout=240_000)
        expect(page.get_by_text("layer changed")).to_be_visible()  # the heatmap's title
        expect(page.get_by_text("clusters for", exact=False).first).to_be_visible()
        expect(page.get_by_text("No Linear or Conv")).to_have_count(0)
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "compress.png", full_page=True)
        store = Store(f"sqlite:///{tmp_path}/store.db", artifacts=tmp_path / "artifacts")
        [compressed] = [r for r in store.list_runs(status="done")
                        if r["name"].startswith("deep_compression -> quantize")]
        heat = store.result(compressed["id"])["sensitivity"]
        assert heat["records"] and any(r["score"] != heat["baseline"] for r in heat["records"])
        variants = store.variants(compressed["id"])
        assert variants[0]["metrics"]["epochs_run"] == 0  # the run's model, not retrained

        # Deploy: export every variant; the int8 one and the shared one (its codebook and
        # indices stored as such) both ship smaller ONNX files
        page.get_by_role("link", name="Deploy", exact=True).click()
        expect(page.get_by_role("heading", name="Deploy", exact=True)).to_be_visible()
        page.get_by_role("button", name=re.compile(r"^Export \d+ variant")).click()
        expect(page.get_by_text("encoded KiB is the variant's compressed")).to_be_visible(
            timeout=180_000)
        expect(page.get_by_text("no smaller than the baseline's")).to_have_count(0)
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "deploy.png", full_page=True)
        folder = store.run_dir(compressed["id"])
        base = (folder / "baseline" / "model.onnx").stat().st_size
        int8 = (folder / variants[-1]["name"] / "model.onnx").stat().st_size
        assert variants[-1]["name"].startswith("quantize-static_int8") and int8 < base / 2
        shared = (folder / variants[1]["name"] / "model.onnx").stat().st_size
        assert variants[1]["name"] == "deep_compression" and shared < base / 2

        # Compare: both fronts drawn
        page.get_by_role("link", name="Compare", exact=True).click()
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible()
        expect(page.locator(".js-plotly-plot")).to_have_count(2)
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "compare.png", full_page=True)


def test_showcase_lands_on_compare_and_fills_the_pareto_plot(app_url):
    """The real showcase (digits, every technique, the race) from one press on Home."""
    from playwright.sync_api import expect

    with browser_page(app_url) as page:
        expect(page.get_by_role("heading", name="Model optimization workbench")).to_be_visible()
        page.wait_for_timeout(1000)
        page.screenshot(path=SHOTS / "home.png", full_page=True)
        started = time.monotonic()
        page.get_by_role("button", name="Showcase", exact=True).click()
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible()
        expect(page.get_by_text("runs finished; the plots fill in")).to_be_visible()
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=180_000)
        # every run done: the progress line goes and the race's curves join the fronts
        expect(page.get_by_text("runs finished; the plots fill in")).to_have_count(
            0, timeout=420_000)
        expect(page.locator(".js-plotly-plot")).to_have_count(3)
        cells = page.locator("[data-testid=stDataFrame] td[role=gridcell]")
        expect(cells.filter(has_text="deep_compression").first).to_be_attached()
        print(f"showcase: every run finished {time.monotonic() - started:.0f} s after the press")
        expect(page.get_by_role("button", name="Download report (HTML)")).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "showcase.png", full_page=True)


def test_a_bookmark_on_a_fresh_server_opens_the_app_not_its_modules(app_url):
    """The first visitor of a fresh server lands on /runs (a bookmark, a reload): the app's
    own navigation and sidebar, not one page per module of the views folder."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{app_url}/runs")
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(
                timeout=60_000)
            expect(page.get_by_role("link", name="Data & Model", exact=True)).to_be_visible()
            expect(page.get_by_text("Run store:")).to_be_visible()
            expect(page.get_by_role("link", name="common", exact=True)).to_have_count(0)
        finally:
            browser.close()


def test_a_refused_upload_is_one_sentence_and_never_reaches_run(app_url):
    """A table whose target never varies is refused on Data & Model in one sentence; the
    Train page still trains the last good selection (digits), never the refused file."""
    from playwright.sync_api import expect

    rows = "\n".join(f"{i},{i % 3},yes" for i in range(30))
    with browser_page(app_url) as page:
        page.get_by_role("link", name="Data & Model", exact=True).click()
        expect(page.get_by_role("heading", name="Data & Model")).to_be_visible()
        page.get_by_text("Upload", exact=True).first.click()
        page.locator("input[type=file]").first.set_input_files(files=[{
            "name": "flat.csv", "mimeType": "text/csv",
            "buffer": f"a,b,label\n{rows}\n".encode()}])
        expect(page.get_by_text("the target has a single class")).to_have_count(1)
        expect(page.get_by_text("Nothing changed", exact=False).first).to_be_visible()
        page.wait_for_timeout(800)
        page.screenshot(path=SHOTS / "refused_upload.png", full_page=True)
        page.get_by_role("link", name="Train", exact=True).click()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible()
        expect(page.get_by_text("Data: digits")).to_be_visible()
        expect(page.get_by_text("flat.csv")).to_have_count(0)


def test_auto_compress_runs_a_short_search_and_deploys_its_recommendation(app_url, tmp_path):
    from playwright.sync_api import expect

    with browser_page(app_url) as page:
        page.get_by_role("link", name="Compress", exact=True).click()
        expect(page.get_by_role("heading", name="Compress", exact=True)).to_be_visible()
        page.get_by_text("Auto-compress: search within a budget", exact=True).click()
        for box, value in (("Trials", "4"), ("Most fine-tuning epochs per stage", "2"),
                           ("Most points of accuracy lost", "3")):
            field = page.get_by_role("spinbutton", name=box, exact=True)
            field.fill(value)
            field.press("Enter")
            page.wait_for_timeout(700)
        page.get_by_role("button", name="Search", exact=True).click()
        expect(page.get_by_role("heading", name="Recommended")).to_be_visible(timeout=300_000)
        expect(page.get_by_text("one dot per trial").first).to_be_visible()
        expect(page.get_by_role("button", name="Download the recipe that replays it")
               ).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "autocompress.png", full_page=True)
        store = Store(f"sqlite:///{tmp_path}/store.db", artifacts=tmp_path / "artifacts")
        [run] = store.list_runs(status="done")
        found = next(v for v in store.variants(run["id"]) if v["name"] == "autocompress")
        expect(page.get_by_text(f"ships in {found['metrics']['size_bytes']:,} bytes",
                                exact=False)).to_be_visible()  # the harness's figure
        page.get_by_role("button", name="Deploy this model").scroll_into_view_if_needed()
        page.wait_for_timeout(800)
        page.screenshot(path=SHOTS / "autocompress_card.png")
        # one click to Deploy, on this run: its recommendation exports like any variant
        page.get_by_role("button", name="Deploy this model").click()
        expect(page.get_by_role("heading", name="Deploy", exact=True)).to_be_visible()
        page.get_by_role("button", name=re.compile(r"^Export \d+ variant")).click()
        expect(page.get_by_text("encoded KiB is the variant's compressed")).to_be_visible(
            timeout=180_000)
        assert (store.run_dir(run["id"]) / "autocompress" / "model.onnx").is_file()
        page.screenshot(path=SHOTS / "autocompress_deploy.png", full_page=True)


def test_a_text_model_goes_through_compress_and_compare(app_url, tmp_path):
    """A zipped BERT classifier (random init, its tokenizer trained on the test's text)
    uploaded on Data & Model with the built-in reviews: the tokenized rows show, a chain of
    structured pruning (heads and neurons) and dynamic int8 runs on Compress, and Compare
    draws both fronts with the fidelity column beside accuracy."""
    import io
    import zipfile

    from playwright.sync_api import expect
    from transformers import BertConfig, BertForSequenceClassification

    from engine.data.datasets import reviews
    from tests.test_text import _tokenizer

    folder = tmp_path / "bert"
    tokenizer = _tokenizer(list(reviews(300, 1)[0]))
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"bert/{f.name}")
    with browser_page(app_url) as page:
        page.get_by_role("link", name="Data & Model", exact=True).click()
        expect(page.get_by_role("heading", name="Data & Model")).to_be_visible()
        page.get_by_text("Upload", exact=True).nth(1).click()  # the model's upload
        page.locator("input[type=file]").first.set_input_files(files=[{
            "name": "bert.zip", "mimeType": "application/zip", "buffer": blob.getvalue()}])
        # the file's name shows once its upload is done; a dataset picked before that lost
        # the upload, in Streamlit's uploader, one run in six (README, Text models)
        expect(page.get_by_role("button", name="Remove bert.zip")).to_be_visible()
        pick(page, "Built-in dataset", "reviews")
        page.get_by_text("Dataset settings", exact=True).click()
        rows = page.get_by_role("spinbutton", name="n samples", exact=True)
        rows.fill("200")
        rows.press("Enter")
        try:
            expect(page.get_by_text("Text tokenized by the tokenizer of")).to_be_visible(
                timeout=90_000)
        finally:
            page.screenshot(path=SHOTS / "text_data_model.png", full_page=True)
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "text_data_model.png", full_page=True)

        page.get_by_role("link", name="Train", exact=True).click()
        epochs = page.get_by_role("spinbutton", name="Epochs", exact=True)
        epochs.fill("2")
        epochs.press("Enter")
        page.wait_for_timeout(800)

        page.get_by_role("link", name="Compress", exact=True).click()
        expect(page.get_by_role("heading", name="Compress", exact=True)).to_be_visible()
        page.get_by_role("button", name="Remove", exact=True).first.click()
        page.get_by_text("prune settings", exact=True).click()
        pick(page, "method", "structured")
        page.get_by_role("button", name="Add step").click()
        expect(page.locator("code", has_text="prune structured").first).to_be_visible()
        pick(page, "Technique", "quantize")
        page.get_by_text("quantize settings", exact=True).click()
        pick(page, "method", "dynamic_int8")
        page.get_by_role("button", name="Add step").click()
        expect(page.locator("code", has_text="quantize dynamic_int8").first).to_be_visible()
        page.get_by_text("Per-layer sensitivity analysis (heatmap)").click()
        page.get_by_role("button", name="Run chain").click()
        expect(page.get_by_text("· done · ")).to_be_visible(timeout=300_000)
        expect(page.get_by_text("heads 4 → 2", exact=False).first).to_be_visible()
        expect(page.locator("[data-testid=stDataFrame] th[role=columnheader]",
                            has_text="fidelity (vs baseline)").first).to_be_attached()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "text_compress.png", full_page=True)

        page.get_by_role("link", name="Compare", exact=True).click()
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible()
        expect(page.locator(".js-plotly-plot")).to_have_count(2)
        cells = page.locator("[data-testid=stDataFrame] td[role=gridcell]")
        expect(cells.filter(has_text="quantize-dynamic_int8").first).to_be_attached()
        expect(page.get_by_text("Fidelity is how closely a variant follows the baseline",
                                exact=False)).to_be_visible()
        page.wait_for_timeout(1500)
        page.screenshot(path=SHOTS / "text_compare.png", full_page=True)
