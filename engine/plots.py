"""Plotly figures from stored results: pure functions, tested on their data.

Each figure has a `*_records` function that computes what is drawn as plain records
(tests assert on those) and a builder that turns the records into a figure. The search
figures, which Optuna draws from a study, are in `engine.search_plots`. Pages only place
the figures. Axis titles always carry units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

METRIC_LABELS = {"loss": "loss", "accuracy": "accuracy (fraction correct)", "r2": "R²",
                 "lr": "learning rate"}
SPLIT_DASH = {"train": "dot", "val": "solid"}
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
           "#db2777", "#4b5563", "#65a30d")


def curve_records(histories: Mapping[str, Mapping[str, Sequence[Any]]],
                  metric: str) -> list[dict[str, Any]]:
    """One record per (run label, split, epoch) for `metric` ("loss", "accuracy", "r2").

    Missing values (NaN or None, as a run without a validation part has) are left out."""
    records = []
    for label, history in histories.items():
        epochs = history.get("epoch", [])
        for split in ("train", "val"):
            values = history.get(f"{split}_{metric}") or []
            for epoch, value in zip(epochs, values, strict=False):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                records.append({"label": label, "split": split, "epoch": epoch,
                                "value": float(value)})
    return records


def curves(histories: Mapping[str, Mapping[str, Sequence[Any]]], metric: str, *,
           title: str | None = None) -> go.Figure:
    """Train (dotted) and validation (solid) curves of `metric`, one colour per run."""
    records = curve_records(histories, metric)
    fig = go.Figure()
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(histories)}
    for label in histories:
        for split in ("train", "val"):
            points = [r for r in records if r["label"] == label and r["split"] == split]
            if not points:
                continue
            name = f"{label} · {split}" if len(histories) > 1 else split
            fig.add_trace(go.Scatter(
                x=[p["epoch"] for p in points], y=[p["value"] for p in points], name=name,
                mode="lines+markers" if len(points) < 30 else "lines",
                line={"color": colours[label], "dash": SPLIT_DASH[split]},
                legendgroup=label))
    fig.update_layout(title=title or f"{METRIC_LABELS.get(metric, metric)} per epoch",
                      xaxis_title="epoch", yaxis_title=METRIC_LABELS.get(metric, metric),
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, height=340,
                      legend={"orientation": "h", "y": -0.25})
    _whole_epochs(fig, max((r["epoch"] for r in records), default=0))
    if metric == "loss" and records and min(r["value"] for r in records) > 0:
        spread = max(r["value"] for r in records) / min(r["value"] for r in records)
        if spread > 50:  # losses spanning decades read better on a log axis
            fig.update_yaxes(**log_axis([r["value"] for r in records]))
    return fig


def log_axis(values: Sequence[float]) -> dict[str, Any]:
    """A log axis whose ticks read 1, 2, 5, 10, 20, 50, ... over the values' range (plotly's
    own labels the minor ticks "2 5" without their decade)."""
    positive = [v for v in values if v and v > 0]
    lo, hi = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if min(positive) / 2.5 <= t <= max(positive) * 2.5]
    return {"type": "log", "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _whole_epochs(fig: go.Figure, last: int) -> None:
    """Over a few epochs, one tick per epoch: Plotly would put ticks at 1.2, 1.4, ..."""
    if 0 < last <= 12:
        fig.update_xaxes(tick0=1, dtick=1)


def lr_schedule(rates: Sequence[float], *, title: str = "learning rate per epoch"
                ) -> go.Figure:
    """The rate each epoch will use, as the engine computes it."""
    fig = go.Figure(go.Scatter(x=list(range(1, len(rates) + 1)), y=list(rates),
                               mode="lines+markers" if len(rates) < 60 else "lines",
                               line={"color": PALETTE[0]}, name="learning rate"))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="learning rate",
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, height=260)
    _whole_epochs(fig, len(rates))
    top = max(rates, default=0.0)
    if top > 0:  # from zero, with the rate's own digits: a flat 0.001 must not read as 0
        fig.update_yaxes(range=[0, top * 1.1], tickformat="~g", rangemode="tozero")
    return fig


def class_balance_records(counts: Mapping[str, int]) -> list[dict[str, Any]]:
    total = sum(counts.values()) or 1
    return [{"class": str(k), "count": int(v), "share": v / total} for k, v in counts.items()]


def class_balance(counts: Mapping[str, int], *, title: str = "class balance (training part)"
                  ) -> go.Figure:
    records = class_balance_records(counts)
    fig = go.Figure(go.Bar(x=[r["class"] for r in records], y=[r["count"] for r in records],
                           text=[f"{r['share']:.0%}" for r in records],
                           marker_color=PALETTE[0]))
    fig.update_layout(title=title, xaxis_title="class", yaxis_title="rows",
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, height=280)
    return fig



def token_lengths(lengths: Sequence[int], limit: int) -> go.Figure:
    """How many tokens each text has before truncation, with the cut at `limit`."""
    fig = go.Figure(go.Histogram(x=list(lengths), marker_color=PALETTE[0], nbinsx=40,
                                 hovertemplate="%{x} tokens: %{y} texts<extra></extra>"))
    fig.add_vline(x=limit, line_dash="dot", line_color="#dc2626",
                  annotation_text=f"cut at {limit}", annotation_position="top right")
    fig.update_layout(title="tokens per text", xaxis_title="tokens (before truncation)",
                      yaxis_title="texts", height=260, margin={"l": 10, "r": 10, "t": 40,
                                                               "b": 10})
    return fig

def image_grid(images: Sequence[Any], labels: Sequence[str], *, columns: int = 8,
               title: str = "sample images") -> go.Figure:
    """A grid of (C, H, W) images in [0, 1] (or any range: each is scaled on its own)."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[str(x) for x in labels],
                        horizontal_spacing=0.01, vertical_spacing=0.08)
    for i, image in enumerate(images):
        img = np.asarray(image, dtype=np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else img * 0
        rgb = np.repeat(img[:1], 3, 0) if img.shape[0] == 1 else img[:3]
        fig.add_trace(go.Image(z=(rgb.transpose(1, 2, 0) * 255).astype("uint8")),
                      row=i // columns + 1, col=i % columns + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=110 * rows + 60, margin={"l": 5, "r": 5, "t": 60,
                                                                    "b": 5})
    return fig


# --- compression: Pareto fronts and sensitivity -------------------------------------------

# One colour per technique family on every page and in the report; mid-tones that read on
# a white and on a dark background alike (the baseline is amber, never black or white).
FAMILY_COLOURS = {None: "#f59e0b", "prune": "#2563eb", "quantize": "#dc2626",
                  "distill": "#16a34a", "lowrank": "#9333ea", "share": "#db2777",
                  "deep_compression": "#0891b2"}
OUTLINE = "rgba(127, 127, 127, 0.9)"  # marker edges visible on light and dark themes
AXIS_TITLES = {"size_bytes": "size of the shipped file (KiB, log scale)",
               "latency_ms": "latency p50 at batch 1 (ms, log scale)",
               "test_accuracy": "test accuracy (fraction correct)", "test_r2": "test R²",
               "test_agreement": "test agreement with the original model (top-1)"}
SHORT_NAMES = {"size_bytes": "size", "latency_ms": "latency", "test_accuracy": "accuracy",
               "test_r2": "R²", "test_agreement": "agreement"}


def family_colour(technique: str | None) -> str:
    """The colour of a technique family (grey for one without its own)."""
    return FAMILY_COLOURS.get(technique, "#6b7280")


def pareto_records(points: Sequence[Mapping[str, Any]], x: str, y: str
                   ) -> list[dict[str, Any]]:
    """Each point with `pareto`: True when no other point is at least as small in `x` and
    at least as good in `y`, and strictly better in one (smaller x, larger y are better)."""
    usable = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    out = []
    for p in usable:
        dominated = any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y])
                        for q in usable if q is not p)
        out.append({**p, "pareto": not dominated})
    return out


def _wrap(text: str, width: int = 64) -> str:
    """Hover text broken into lines of about `width` characters."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join([*lines, line] if line else lines)


def pareto(points: Sequence[Mapping[str, Any]], x: str, y: str, *,
           title: str | None = None, descriptions: Mapping[str, str] | None = None
           ) -> go.Figure:
    """Scatter of variants (one colour per technique family, the baseline a star) with the
    Pareto front drawn; hover shows run, variant, chain and, from `descriptions` (technique
    -> one sentence, the registry's), what the technique does. `points` need keys name,
    technique, chain, run and the two metrics."""
    records = pareto_records(points, x, y)
    scale = 1 / 1024 if x == "size_bytes" else 1
    descriptions = descriptions or {}
    fig = go.Figure()
    for family in dict.fromkeys(r.get("technique") for r in records):
        group = [r for r in records if r.get("technique") == family]
        about = _wrap(descriptions.get(family, "")) if family else "the trained model"
        fig.add_trace(go.Scatter(
            x=[r[x] * scale for r in group], y=[r[y] for r in group], mode="markers",
            name=family or "baseline",
            marker={"color": family_colour(family), "size": 15 if family is None else 11,
                    "symbol": "star" if family is None else "circle",
                    "line": {"width": 1, "color": OUTLINE}},
            text=[f"<b>{r.get('run', '')} · {r['name']}</b><br>{r.get('chain', '')}"
                  + (f"<br><i>{about}</i>" if about else "") for r in group],
            hovertemplate=f"%{{text}}<br>{SHORT_NAMES.get(x, x)} %{{x:.4g}}"
                          f"{' KiB' if x == 'size_bytes' else ' ms' if x == 'latency_ms' else ''}"
                          f"<br>{SHORT_NAMES.get(y, y)} %{{y:.4f}}<extra></extra>"))
    front = sorted((r for r in records if r["pareto"]), key=lambda r: r[x])
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[r[x] * scale for r in front], y=[r[y] for r in front],
                                 mode="lines", name="Pareto front", hoverinfo="skip",
                                 line={"color": "#6b7280", "dash": "dash", "shape": "hv"}))
    fig.update_layout(title=title or f"{SHORT_NAMES.get(y, y)} vs {SHORT_NAMES.get(x, x)}",
                      xaxis_title=AXIS_TITLES.get(x, x), yaxis_title=AXIS_TITLES.get(y, y),
                      height=420, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"title": {"text": "technique"}})
    xs = [r[x] for r in records if r[x] and r[x] > 0]
    if xs and max(xs) / min(xs) > 10:  # a log axis only where the points span decades
        fig.update_xaxes(**log_axis([v * scale for v in xs]))  # in the axis's own unit
    else:
        fig.update_layout(xaxis_title=fig.layout.xaxis.title.text.replace(", log scale", ""))
    return fig


def sensitivity_matrix(sens: Mapping[str, Any]) -> dict[str, Any]:
    """{"layers", "columns", "z"}: the score of each layer (row) under each change (column)."""
    records = sens.get("records", [])
    layers = list(dict.fromkeys(r["layer"] for r in records))
    columns = list(dict.fromkeys(f"{r['technique']} {r['setting']}" for r in records))
    z = [[None] * len(columns) for _ in layers]
    for r in records:
        z[layers.index(r["layer"])][columns.index(f"{r['technique']} {r['setting']}")] = \
            r["score"]
    return {"layers": layers, "columns": columns, "z": z}


def sensitivity_heatmap(sens: Mapping[str, Any]) -> go.Figure:
    data = sensitivity_matrix(sens)
    metric = sens.get("metric", "score")
    fig = go.Figure(go.Heatmap(
        z=data["z"], x=data["columns"], y=data["layers"], colorscale="RdYlGn",
        zmin=min((v for row in data["z"] for v in row if v is not None), default=0),
        zmax=sens.get("baseline"), colorbar={"title": metric},
        text=[[f"{v:.3f}" if v is not None else "" for v in row] for row in data["z"]],
        texttemplate="%{text}"))
    fig.update_layout(title=f"{metric} on the {sens.get('part', 'val')} part with one layer "
                            f"changed (unchanged: {sens.get('baseline', 0):.3f})",
                      xaxis_title="change applied to that layer alone", yaxis_title="layer",
                      height=120 + 40 * len(data["layers"]),
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


# --- diagnostics -----------------------------------------------------------------------------

def _band(fig: go.Figure, x: Sequence[Any], mean: Sequence[float], std: Sequence[float],
          name: str, colour: str, dash: str) -> None:
    """A mean line with a shaded ± one standard deviation band."""
    upper = [m + s for m, s in zip(mean, std, strict=True)]
    lower = [m - s for m, s in zip(mean, std, strict=True)]
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=upper + lower[::-1], fill="toself",
                             fillcolor=colour, opacity=0.15, line={"width": 0},
                             hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(x=list(x), y=list(mean), name=name, mode="lines+markers",
                             line={"color": colour, "dash": dash}))


def learning_curve(lc: Mapping[str, Any]) -> go.Figure:
    """Train and validation score against training-set size, ± one std over repeats."""
    fig = go.Figure()
    _band(fig, lc["train_sizes"], lc["train_score"], lc["train_std"], "train", PALETTE[0],
          "dot")
    _band(fig, lc["train_sizes"], lc["val_score"], lc["val_std"], "validation", PALETTE[1],
          "solid")
    metric = METRIC_LABELS.get(lc.get("metric", ""), lc.get("metric", "score"))
    fig.update_layout(title="learning curve", xaxis_title="training rows",
                      yaxis_title=metric, height=340, margin={"l": 10, "r": 10, "t": 40,
                                                              "b": 10})
    return fig


def validation_curve(vc: Mapping[str, Any]) -> go.Figure:
    """Train and validation score against one complexity knob, ± one std over repeats."""
    labels = [str(v) for v in vc["values"]]
    fig = go.Figure()
    _band(fig, labels, vc["train_score"], vc["train_std"], "train", PALETTE[0], "dot")
    _band(fig, labels, vc["val_score"], vc["val_std"], "validation", PALETTE[1], "solid")
    metric = METRIC_LABELS.get(vc.get("metric", ""), vc.get("metric", "score"))
    fig.update_layout(title=f"validation curve over {vc['param']}", xaxis_title=vc["param"],
                      yaxis_title=metric, height=340, margin={"l": 10, "r": 10, "t": 40,
                                                              "b": 10})
    fig.update_xaxes(type="category")
    return fig


def bias_variance_records(bv: Mapping[str, Any]) -> list[dict[str, Any]]:
    names = [("expected_loss", "expected loss"), ("bias", "bias²" if bv["loss"] == "squared"
                                                  else "bias"), ("variance", "variance")]
    if "net_variance" in bv:
        names.append(("net_variance", "net variance"))
    return [{"part": label, "value": float(bv[key])} for key, label in names]


def bias_variance(bv: Mapping[str, Any]) -> go.Figure:
    records = bias_variance_records(bv)
    loss = "squared error" if bv["loss"] == "squared" else "0-1 loss"
    fig = go.Figure(go.Bar(x=[r["part"] for r in records], y=[r["value"] for r in records],
                           marker_color=[PALETTE[3], PALETTE[1], PALETTE[0], PALETTE[4]],
                           text=[f"{r['value']:.4g}" for r in records]))
    fig.update_layout(title=f"bias-variance of the test {loss}, {bv['rounds']} rounds",
                      xaxis_title="component", yaxis_title=loss, height=320,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def landscape(ls: Mapping[str, Any]) -> go.Figure:
    """The loss around the trained weights along filter-normalized random directions."""
    if "betas" in ls:
        fig = go.Figure(go.Contour(x=ls["alphas"], y=ls["betas"], z=ls["loss"],
                                   colorscale="Viridis", colorbar={"title": "loss"}))
        fig.update_layout(xaxis_title="direction 1", yaxis_title="direction 2")
    else:
        fig = go.Figure(go.Scatter(x=ls["alphas"], y=ls["loss"], mode="lines+markers",
                                   line={"color": PALETTE[0]}))
        fig.update_layout(xaxis_title="step along a filter-normalized direction",
                          yaxis_title="loss")
    fig.update_layout(title=f"loss landscape (sharpness {ls.get('sharpness', 0):.3g})",
                      height=340, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
