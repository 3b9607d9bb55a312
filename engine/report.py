"""A standalone HTML report of any set of runs: one file to send, opened offline.

    html = report.build(store, run_ids)           # the page as text
    report.write(store, run_ids, "report.html")   # the same, written to a file
    report.export_png(store, run_ids, "figures")  # the main figures as PNG files

The page holds the machine the figures were measured on, the accuracy/size/latency table,
both Pareto plots, the training and fine-tuning curves, the diagnostics with their
verdict where a run has them, and the recipe of every variant (the run's recipe with its
compression chain cut after that variant's step, so it replays exactly that variant).
Plotly's library is inlined once (about 4.7 MB), so nothing is fetched from a network; each
plot keeps its toolbar, whose camera button saves that plot as a PNG, offline too.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine import plots
from engine.comparison import (
    SOURCES,
    figures,
    headline,
    run_label,
    table_records,
    training_histories,
    variant_points,
    variant_recipe,
)
from engine.errors import UserError
from engine.latency import machine
from engine.store import ACTIVE, Store

try:  # PNG export only; the HTML report needs nothing of it
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - it is in requirements.txt
    sync_playwright = None

PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "toImageButtonOptions": {"format": "png", "scale": 2}}
TEMPLATE = "plotly_white"  # a document to send: light, as printed
def build(store: Store, run_ids: Sequence[str], *, title: str = "Model optimization report"
          ) -> str:
    """The report of `run_ids` as one self-contained HTML page (see the module's doc)."""
    if not run_ids:
        raise UserError("pick at least one run to put in the report.")
    runs = [store.get_run(i) for i in run_ids]
    missing = [i for i, r in zip(run_ids, runs, strict=True) if r is None]
    if missing:
        raise UserError(f"there is no run {missing[0]!r} in the store; pick one of the runs "
                        f"listed on the Runs page.")
    results = {r["id"]: store.result(r["id"]) for r in runs}
    parts: list[str] = []
    add_figure = _figure_writer()
    parts.append(f"<h1>{_e(title)}</h1><p class=muted>{len(runs)} run(s), written "
                 f"{_e(time.strftime('%Y-%m-%d %H:%M'))}. Every plot is interactive: hover for "
                 f"details, drag to zoom, and its camera button saves it as a PNG.</p>")
    lines = headline(store, run_ids)
    if lines:
        parts.append("<h2>In one line each</h2><p class=muted>Each compressed variant against "
                     "its own run's baseline: size of the shipped file, score, speed at batch "
                     "1.</p><ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>")
    parts.append(_machines(runs, results))
    points = variant_points(store, run_ids)
    if points:
        parts.append("<h2>Accuracy, size and latency</h2>")
        parts.append(_table(table_records(points)))
        parts.append(f"<p class=muted>{_e(SOURCES)}</p>")
    main = figures(store, run_ids)
    if "pareto_size" in main:
        parts.append("<h2>Pareto fronts</h2><div class=row>" + add_figure(main["pareto_size"])
                     + add_figure(main["pareto_latency"]) + "</div>")
    curves = _curve_section(store, runs, results, main, add_figure)
    if curves:
        parts.append("<h2>Loss curves</h2>" + curves)
    for run in runs:
        diagnostics = results[run["id"]].get("diagnostics") or {}
        if diagnostics:
            parts.append(_diagnostics(run_label(run), diagnostics, add_figure))
    parts.append("<h2>Recipes</h2><p class=muted>Each replays headless: save it as "
                 "recipe.json and run <code>python -m engine run recipe.json --out DIR</code>."
                 "</p>")
    for run in runs:
        parts.append(_recipes(run, results[run["id"]]))
    return _page(title, "\n".join(parts))


def write(store: Store, run_ids: Sequence[str], path: str | Path, **kwargs: Any) -> Path:
    """Write `build(store, run_ids)` to `path` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build(store, run_ids, **kwargs), encoding="utf-8")
    return path


def export_png(store: Store, run_ids: Sequence[str], folder: str | Path, *,
               scale: float = 2.0) -> list[Path]:
    """The main figures (`figures`) as PNG files in `folder`, drawn by plotly.js itself in
    a headless Chromium through Playwright (both already used by the browser test), so the
    PNG is exactly what the report shows. Kaleido is not used: it is not installed here and
    needs a Chrome of its own. Without Chromium, a UserError says so."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if sync_playwright is None:
        raise UserError("PNG export needs Playwright (pip install -r requirements.txt); "
                        "the report's camera buttons save PNGs without it.")
    if not Path(chromium).exists():
        raise UserError("PNG export needs Chromium (apt-get install -y chromium); the "
                        "report's camera buttons save PNGs without it.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless",
                                    "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 900, "height": 600},
                                device_scale_factor=scale)
        for name, fig in figures(store, run_ids).items():
            fig.update_layout(template=TEMPLATE)
            page.set_content(fig.to_html(include_plotlyjs=True, full_html=True,
                                         config={"displayModeBar": False}))
            page.wait_for_selector(".main-svg")
            path = folder / f"{name}.png"
            page.locator(".js-plotly-plot").first.screenshot(path=path)
            written.append(path)
        browser.close()
    return written


# --- sections ----------------------------------------------------------------------------------

def _figure_writer() -> Any:
    """A function turning a figure into an HTML fragment; the first call inlines plotly.js,
    the later ones reuse it, so the page carries the library once."""
    state = {"first": True}

    def add(fig: Any) -> str:
        fig = fig.update_layout(template=TEMPLATE)
        text = fig.to_html(full_html=False, include_plotlyjs=state["first"],
                           config=PLOT_CONFIG, default_width="100%")
        state["first"] = False
        return f"<div class=fig>{text}</div>"

    return add


def _machines(runs: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> str:
    """Where the figures were measured: each distinct machine the runs stored."""
    seen: dict[str, list[str]] = {}
    for run in runs:
        info = results[run["id"]].get("machine")
        device = results[run["id"]].get("device") or run.get("device")
        text = _describe_machine(info, device) if info else "not recorded (the run has not " \
            "finished)"
        seen.setdefault(text, []).append(run_label(run))
    items = "".join(f"<li>{_e(text)} <span class=muted>({_e(', '.join(names))})</span></li>"
                    for text, names in seen.items())
    here = _describe_machine(machine(), None)
    return (f"<h2>Measured on</h2><ul>{items}</ul><p class=muted>This report was written on "
            f"{_e(here)}.</p>")


def _describe_machine(info: dict[str, Any], device: str | None) -> str:
    words = [f"{info.get('processor', '?')} on {info.get('platform', '?')}",
             f"Python {info.get('python', '?')}", f"torch {info.get('torch', '?')}",
             f"{info.get('threads', '?')} thread(s)"]
    if info.get("gpu"):
        words.append(f"GPU {info['gpu']}")
    if device:
        words.append(f"device {device}")
    return ", ".join(words)


def _curve_section(store: Store, runs: list[dict[str, Any]], results: dict[str, Any],
                   main: dict[str, Any], add_figure: Any) -> str:
    out = []
    if "training_loss" in main:
        histories = training_histories(store, [r["id"] for r in runs])
        metric = "accuracy" if any("val_accuracy" in h for h in histories.values()) else "r2"
        out.append("<div class=row>" + add_figure(main["training_loss"]) + add_figure(
            plots.curves(histories, metric, title=f"training: {metric} per epoch")) + "</div>")
    tuned = {}
    for run in runs:
        for v in results[run["id"]]["variants"]:
            if v["name"] != "baseline" and (v.get("history") or {}).get("epoch"):
                tuned[f"{run_label(run)} · {v['name']}"] = v["history"]
    if tuned:
        out.append(add_figure(plots.curves(tuned, "loss",
                                           title="fine-tuning after each compression step: "
                                                 "loss per epoch")))
    return "".join(out)


def _diagnostics(label: str, found: dict[str, Any], add_figure: Any) -> str:
    out = [f"<h2>Diagnostics: {_e(label)}</h2>"]
    if found.get("verdict"):
        out.append(f"<p class=verdict><b>{_e(found['verdict'].replace('_', ' '))}.</b> "
                   f"{_e(' '.join(found.get('reasons', [])))}</p>")
        if found.get("suggestions"):
            out.append("<p>What to try next:</p><ul>" + "".join(
                f"<li>{_e(s)}</li>" for s in found["suggestions"]) + "</ul>")
    charts = [(plots.learning_curve, "learning_curve"), (plots.validation_curve,
              "validation_curve"), (plots.bias_variance, "bias_variance"),
              (plots.landscape, "landscape")]
    shown = [add_figure(fn(found[key])) for fn, key in charts if found.get(key)]
    if shown:
        out.append("<div class=row>" + "".join(shown) + "</div>")
    cx = found.get("complexity")
    if cx:
        rad = (cx.get("rademacher") or {}).get("fit")
        out.append(f"<p>{cx.get('params', 0):,} parameters, {cx.get('nonzero_params', 0):,} "
                   f"non-zero, {cx.get('flops', 0):,} FLOPs per sample"
                   + (f", fits random labels {rad:.2f} (Rademacher estimate)" if rad is not None
                      else "") + ".</p>")
    return "".join(out)


def _recipes(run: dict[str, Any], result: dict[str, Any]) -> str:
    recipe = result.get("trained_recipe") or run["recipe"]
    names = [v["name"] for v in result["variants"]] or ["baseline"]
    status = "" if run["status"] == "done" else f" ({run['status']})"
    if run["status"] in ACTIVE:
        status = f" ({run['status']}: variants so far)"
    blocks = []
    searched = (result.get("autocompress") or {}).get("recipe")  # replays the winner
    for position, name in enumerate(names):
        replay = searched if name == "autocompress" and searched else variant_recipe(
            recipe, position)
        text = json.dumps(replay, indent=2, default=str)
        blocks.append(f"<details><summary>{_e(run_label(run))} · {_e(name)}{_e(status)}"
                      f"</summary><pre>{_e(text)}</pre></details>")
    return "".join(blocks)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_e(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(v))}</td>" for v in row.values()) + "</tr>"
                   for row in rows)
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>" \
           f"</table></div>"


def _page(title: str, body: str) -> str:
    style = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;
max-width:1400px;padding:0 1rem;color:#1f2937;background:#fff;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #e5e7eb}
.muted{color:#6b7280;font-size:.9rem}.row{display:grid;gap:1rem;
grid-template-columns:repeat(2,minmax(0,1fr))}.fig{min-width:0}.scroll{overflow-x:auto}
@media (max-width:900px){.row{grid-template-columns:minmax(0,1fr)}}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #e5e7eb;
padding:.3rem .5rem;text-align:left}th{background:#f3f4f6}tbody tr:nth-child(even){
background:#f9fafb}pre{background:#f3f4f6;padding:.8rem;overflow-x:auto;font-size:.8rem}
details{margin:.3rem 0}summary{cursor:pointer}.verdict{padding:.6rem;background:#eff6ff;
border-left:4px solid #2563eb}"""
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=False)  # text only: never inside an attribute


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    return f"{value:,}" if isinstance(value, int) else str(value)
