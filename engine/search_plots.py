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

from engine.plots import PALETTE, pareto

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
