"""The hyperparameter search's figures: Optuna's own, restyled like `engine.plots`.

The study (loaded by the page from the run store, by the name its trial events carry) is
the data. Optuna computes what is drawn (the best so far, the normalized axes, fANOVA
importances); these functions only restyle its figures. Optuna is imported inside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from engine.plots import OUTLINE, PALETTE, log_axis, pareto

if TYPE_CHECKING:  # a study's type only
    import optuna

SEARCH_COLOURS = "Viridis"  # trials coloured by their objective: low purple, high yellow
OBJECTIVE_LABELS = {"val_score": "validation score (accuracy or R²)",
                    "val_loss": "validation loss", "params": "parameters (count)",
                    "latency_ms": "latency p50 at batch 1 (ms)"}
TRIAL_AXIS = "trial (number, in start order)"


def objective_label(name: str) -> str:
    """A tune objective's name as an axis title, with its unit."""
    return OBJECTIVE_LABELS.get(name, name)


def _first_objective(study: optuna.Study) -> Any:
    """Optuna's `target` for a multi-objective study (its first objective); None for one
    objective, so that Optuna reads the value and the direction itself."""
    return (lambda trial: trial.values[0]) if len(study.directions) > 1 else None


def _restyle(fig: go.Figure, title: str, *, height: int,
             margin: Mapping[str, int] | None = None) -> go.Figure:
    """Our title, size and margins; the background left to the theme, as in our figures."""
    fig.layout.title = {"text": title}
    fig.update_layout(height=height, plot_bgcolor=None,
                      margin=margin or {"l": 10, "r": 10, "t": 40, "b": 10})
    fig.data = [t for t in fig.data if t.x is None or len(t.x)]  # Optuna's empty legend
    return fig                                                   # entries (infeasible trials)


def optimization_history(study: optuna.Study, objectives: Sequence[str] = ("val_score",)
                         ) -> go.Figure:
    """Each complete trial's (first) objective and, for one objective, the best so far:
    `optuna.visualization.plot_optimization_history`, restyled."""
    from optuna.visualization import plot_optimization_history

    name = objective_label(objectives[0])
    fig = plot_optimization_history(study, target=_first_objective(study), target_name=name)
    for trace in fig.data:
        if trace.mode == "markers":
            trace.update(name="trial", marker={"color": PALETTE[0]})
        else:
            trace.update(name="best so far", line={"color": PALETTE[1], "shape": "hv"})
    fig.update_layout(xaxis_title=TRIAL_AXIS, yaxis_title=name)
    return _restyle(fig, "optimization history", height=320)


def parallel_coordinates(study: optuna.Study, objectives: Sequence[str] = ("val_score",)
                         ) -> go.Figure:
    """One line per complete trial across the objective and every parameter, coloured by
    the (first) objective: `optuna.visualization.plot_parallel_coordinate`, restyled."""
    from optuna.visualization import plot_parallel_coordinate

    name = objective_label(objectives[0])
    fig = plot_parallel_coordinate(study, target=_first_objective(study), target_name=name)
    for trace in fig.data:
        if trace.mode == "lines" and trace.y:  # a trial; y[0] is its objective, in [0, 1]
            level = min(max(float(trace.y[0]), 0.0), 1.0)
            trace.line.color = sample_colorscale(SEARCH_COLOURS, [level])[0]
        elif trace.marker.colorscale is not None:  # the colour bar
            trace.marker.update(colorscale=SEARCH_COLOURS, reversescale=False,
                                colorbar={"title": {"text": name}})
    return _restyle(fig, "parameters of every trial", height=360,
                    margin={"l": 40, "r": 40, "t": 60, "b": 20})


def param_importances(study: optuna.Study, objectives: Sequence[str] = ("val_score",)
                      ) -> go.Figure:
    """How much of each objective's variance each parameter explains (fANOVA, seeded, so a
    redraw shows the same bars): `optuna.visualization.plot_param_importances`, restyled."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import plot_param_importances

    fig = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                 target_name=objective_label(objectives[0]))
    for i, trace in enumerate(fig.data):
        label = objectives[i] if i < len(objectives) else trace.name
        trace.update(name=objective_label(label), marker={"color": PALETTE[(i + 2) % len(
            PALETTE)]})
    rows = max((len(t.y) for t in fig.data if t.y is not None), default=1)
    fig.update_layout(xaxis_title="share of the objective's variance (fraction)",
                      yaxis_title="parameter", showlegend=len(fig.data) > 1)
    return _restyle(fig, "parameter importance (fANOVA)",
                    height=80 + 40 * rows * max(len(fig.data), 1))


def trial_front(trials: Sequence[Mapping[str, Any]], objectives: Sequence[str]
                ) -> go.Figure | None:
    """The Pareto front of finished trials, as it grows, for a search on the validation
    score and one cost (None for any other pair of objectives): `trials` are the run's
    trial events, each with number, params and values."""
    if len(objectives) != 2 or objectives[0] != "val_score":
        return None
    points = [{"name": f"trial {t['number']}", "technique": "trial", "chain": str(t["params"]),
               objectives[0]: t["values"][0], objectives[1]: t["values"][1]}
              for t in trials if t.get("values")]
    return pareto(points, objectives[1], objectives[0], title="Pareto front of the trials")


def search_front_records(trials: Sequence[Mapping[str, Any]], objective: str
                         ) -> list[dict[str, Any]]:
    """An auto-compress search's finished trials as points: cost (KiB or ms), the score
    lost (points, on the validation rows), whether it met the budget, whether it is on
    the front (nothing both cheaper and better)."""
    points = []
    for t in trials:
        m = t.get("metrics")
        if t.get("state") != "COMPLETE" or not m or (objective == "latency"
                                                    and m.get("latency_ms") is None):
            continue
        cost = m["size_bytes"] / 1024 if objective == "size" else m["latency_ms"]
        points.append({"number": t["number"], "cost": cost, "lost": m["drop"] * 100,
                       "meets": bool(t.get("meets_budget")),
                       "chain": " -> ".join(s["technique"] + (f" {s['method']}" if s.get(
                           "method") else "") for s in t.get("chain") or []) or "none"})
    for p in points:
        p["front"] = not any(q["cost"] <= p["cost"] and q["lost"] <= p["lost"]
                             and (q["cost"], q["lost"]) != (p["cost"], p["lost"])
                             for q in points)
    return points


def search_front(trials: Sequence[Mapping[str, Any]], objective: str, *,
                 max_drop: float | None = None, chosen: int | None = None) -> go.Figure:
    """Points lost against cost for every finished trial, the budget's line, the front,
    and the recommended trial ringed."""
    records = search_front_records(trials, objective)
    unit = "KiB" if objective == "size" else "ms"
    fig = go.Figure()
    for meets, colour, name in ((True, "#16a34a", "within the budget"),
                                (False, "#9ca3af", "over the budget")):
        group = [r for r in records if r["meets"] == meets]
        fig.add_trace(go.Scatter(
            x=[r["cost"] for r in group], y=[r["lost"] for r in group], mode="markers",
            name=name, marker={"color": colour, "size": 10, "line": {"width": 1,
                                                                     "color": OUTLINE}},
            text=[f"trial {r['number']}: {r['chain']}" for r in group],
            hovertemplate=f"%{{text}}<br>%{{x:.4g}} {unit}<br>%{{y:.2f}} points lost"
                          f"<extra></extra>"))
    front = sorted((r for r in records if r["front"]), key=lambda r: r["cost"])
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[r["cost"] for r in front], y=[r["lost"] for r in front],
                                 mode="lines", name="Pareto front", hoverinfo="skip",
                                 line={"color": "#6b7280", "dash": "dash", "shape": "hv"}))
    picked = [r for r in records if r["number"] == chosen]
    if picked:
        fig.add_trace(go.Scatter(x=[picked[0]["cost"]], y=[picked[0]["lost"]], mode="markers",
                                 name="recommended", hoverinfo="skip", marker={
                                     "size": 20, "symbol": "circle-open",
                                     "color": "#2563eb", "line": {"width": 3}}))
    if max_drop is not None:
        fig.add_hline(y=max_drop * 100, line_dash="dot", line_color="#dc2626",
                      annotation_text="budget", annotation_position="top left")
    title = "size of the shipped file" if objective == "size" else "latency at batch 1"
    fig.update_layout(title=f"Points lost vs {title}, one dot per trial",
                      xaxis_title=f"{title} ({unit}, log scale)",
                      yaxis_title="points lost on the validation rows", height=420,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    costs = [r["cost"] for r in records if r["cost"] > 0]
    if costs:
        fig.update_xaxes(**log_axis(costs))
    return fig
