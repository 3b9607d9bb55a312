"""Plot builders: assert on the records they draw, and that figures carry units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import plots, search_plots


def test_curve_records_skip_missing_values_and_keep_order():
    history = {"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.25],
               "val_loss": [1.1, math.nan, None]}
    records = plots.curve_records({"a": history}, "loss")
    assert [(r["split"], r["epoch"], r["value"]) for r in records] == [
        ("train", 1, 1.0), ("train", 2, 0.5), ("train", 3, 0.25), ("val", 1, 1.1)]


def test_curves_overlay_runs_with_one_colour_each():
    histories = {"sgd": {"epoch": [1, 2], "train_accuracy": [0.5, 0.6],
                         "val_accuracy": [0.4, 0.5]},
                 "adam": {"epoch": [1, 2], "train_accuracy": [0.7, 0.9],
                          "val_accuracy": [0.6, 0.8]}}
    fig = plots.curves(histories, "accuracy")
    assert [t.name for t in fig.data] == ["sgd · train", "sgd · val", "adam · train",
                                          "adam · val"]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[0].line.dash == "dot" and fig.data[1].line.dash == "solid"
    assert fig.layout.xaxis.title.text == "epoch"
    assert "accuracy" in fig.layout.yaxis.title.text


def test_loss_spanning_decades_uses_a_log_axis():
    fig = plots.curves({"a": {"epoch": [1, 2, 3], "train_loss": [10.0, 1.0, 0.01]}}, "loss")
    assert fig.layout.yaxis.type == "log"
    # every tick names its value (plotly's own minor labels read "2 5" with no decade)
    assert list(fig.layout.yaxis.ticktext) == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5",
                                               "1", "2", "5", "10", "20"]


def test_lr_schedule_and_class_balance():
    fig = plots.lr_schedule([0.1, 0.05, 0.025])
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [0.1, 0.05, 0.025]
    records = plots.class_balance_records({"a": 3, "b": 1})
    assert records == [{"class": "a", "count": 3, "share": 0.75},
                       {"class": "b", "count": 1, "share": 0.25}]
    assert plots.class_balance({"a": 3, "b": 1}).data[0].text == ("75%", "25%")


def test_a_constant_rate_is_drawn_from_zero_with_its_own_digits():
    fig = plots.lr_schedule([0.001] * 8)  # plotly's own range would centre 0.001 on 0
    assert fig.layout.yaxis.range == (0, 0.0011) and fig.layout.yaxis.tickformat == "~g"


def test_image_grid_has_one_image_per_sample():
    images = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    fig = plots.image_grid(images, [str(i) for i in range(10)], columns=5)
    assert len(fig.data) == 10 and fig.data[0].z.shape == (8, 8, 3)


def test_pareto_records_mark_the_non_dominated_points():
    points = [{"name": "base", "size_bytes": 100, "test_accuracy": 0.95},
              {"name": "small", "size_bytes": 10, "test_accuracy": 0.94},
              {"name": "worse", "size_bytes": 50, "test_accuracy": 0.90},
              {"name": "tiny", "size_bytes": 5, "test_accuracy": 0.80}]
    marks = {r["name"]: r["pareto"] for r in plots.pareto_records(points, "size_bytes",
                                                                   "test_accuracy")}
    assert marks == {"base": True, "small": True, "worse": False, "tiny": True}
    fig = plots.pareto([{**p, "technique": None if p["name"] == "base" else "prune"}
                        for p in points], "size_bytes", "test_accuracy")
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert list(front.x) == [5 / 1024, 10 / 1024, 100 / 1024]  # KiB, smallest first
    assert fig.data[0].marker.symbol == "star"  # the baseline
    assert fig.layout.xaxis.type == "log"


def test_sensitivity_matrix_has_one_row_per_layer():
    sens = {"metric": "accuracy", "baseline": 0.9, "records": [
        {"layer": "fc1", "technique": "prune", "setting": "50%", "score": 0.88},
        {"layer": "fc1", "technique": "quantize", "setting": "4-bit", "score": 0.89},
        {"layer": "out", "technique": "prune", "setting": "50%", "score": 0.7}]}
    data = plots.sensitivity_matrix(sens)
    assert data["layers"] == ["fc1", "out"]
    assert data["columns"] == ["prune 50%", "quantize 4-bit"]
    assert data["z"] == [[0.88, 0.89], [0.7, None]]
    assert plots.sensitivity_heatmap(sens).data[0].zmax == 0.9


def test_pareto_colours_families_alike_and_hover_says_what_a_technique_does():
    points = [{"name": "baseline", "technique": None, "latency_ms": 0.05, "test_accuracy": 0.9},
              {"name": "p", "technique": "prune", "latency_ms": 0.04, "test_accuracy": 0.89},
              {"name": "q", "technique": "quantize", "latency_ms": 0.02, "test_accuracy": 0.88}]
    fig = plots.pareto(points, "latency_ms", "test_accuracy",
                       descriptions={"prune": "Pruning: zero the least important weights."})
    by_name = {t.name: t for t in fig.data}
    for family in ("prune", "quantize"):
        assert by_name[family].marker.color == plots.FAMILY_COLOURS[family]
    assert by_name["baseline"].marker.color == plots.family_colour(None)
    assert "zero the least important weights" in by_name["prune"].text[0]
    assert "ms" in fig.layout.xaxis.title.text and "accuracy" in fig.layout.yaxis.title.text
    # no pure black or white in a family colour: both themes must show every point
    assert not {"#000000", "#ffffff", "#111827"} & set(plots.FAMILY_COLOURS.values())


def test_every_diagnostic_and_search_figure_titles_its_axes():
    bv = plots.bias_variance({"loss": "0-1", "rounds": 3, "expected_loss": 0.2, "bias": 0.1,
                              "variance": 0.1})
    study = small_study()
    for fig in (bv, search_plots.optimization_history(study),
                search_plots.param_importances(study)):
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


# --- the search figures: Optuna's, drawn from a study and restyled ----------------------------

def small_study(directions: tuple[str, ...] = ("minimize",), n_trials: int = 5):
    """An in-memory study over x and y in [0, 1], seeded: the objective is x + y/10 (and,
    for a second objective, 1 - x)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(directions),
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        return (x + y / 10, 1 - x)[:len(directions)] if len(directions) > 1 else x + y / 10

    study.optimize(objective, n_trials=n_trials)
    return study


def test_optimization_history_shows_each_complete_trial_and_the_best_so_far():
    import optuna
    from optuna.distributions import FloatDistribution

    study = small_study()
    study.add_trial(optuna.trial.create_trial(  # pruned trials have no value to draw
        state=optuna.trial.TrialState.PRUNED, params={"x": 0.5, "y": 0.5},
        distributions={"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}))
    fig = search_plots.optimization_history(study, ["val_loss"])
    trial, best = fig.data
    values = [t.value for t in study.trials if t.value is not None]
    assert (trial.name, best.name) == ("trial", "best so far")
    assert list(trial.x) == [0, 1, 2, 3, 4] and list(trial.y) == values
    running = [min(values[:i + 1]) for i in range(len(values))]  # minimized
    assert list(best.x) == [0, 1, 2, 3, 4, 5]  # the best so far carries on over trial 5
    assert list(best.y) == [*running, running[-1]]
    assert trial.marker.color == plots.PALETTE[0] and best.line.color == plots.PALETTE[1]
    assert fig.layout.title.text == "optimization history"
    assert fig.layout.yaxis.title.text == search_plots.objective_label("val_loss")
    assert "trial" in fig.layout.xaxis.title.text


def test_parallel_coordinates_draw_one_line_per_trial_coloured_by_its_objective():
    from plotly.colors import sample_colorscale

    study = small_study(n_trials=6)
    fig = search_plots.parallel_coordinates(study)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 6
    assert list(fig.layout.xaxis.ticktext) == [search_plots.objective_label("val_score"), "x", "y"]
    best = max(lines, key=lambda t: t.y[0])  # the highest objective, at the top of its axis
    assert best.line.color == sample_colorscale(search_plots.SEARCH_COLOURS, [1.0])[0]
    colour_bar = next(t for t in fig.data if t.mode == "markers")
    assert colour_bar.marker.colorbar.title.text == search_plots.objective_label("val_score")
    assert fig.layout.title.text == "parameters of every trial"
    assert fig.layout.plot_bgcolor is None  # the theme's background, as our other figures


def test_param_importances_are_shares_per_objective():
    fig = search_plots.param_importances(small_study(n_trials=12))
    [bars] = fig.data
    assert set(bars.y) == {"x", "y"} and abs(sum(bars.x) - 1) < 1e-6
    importance = dict(zip(bars.y, bars.x, strict=True))
    assert importance["x"] > importance["y"]  # the objective is x + y/10
    assert bars.marker.color == plots.PALETTE[2]
    assert "variance" in fig.layout.xaxis.title.text
    two = search_plots.param_importances(small_study(("maximize", "minimize"), n_trials=12),
                                  ["val_score", "params"])
    assert [t.name for t in two.data] == [search_plots.objective_label("val_score"),
                                          search_plots.objective_label("params")]


def test_multi_objective_studies_draw_their_first_objective():
    study = small_study(("maximize", "minimize"))
    fig = search_plots.optimization_history(study, ["val_score", "params"])
    assert [t.name for t in fig.data] == ["trial"]  # no "best so far" on a Pareto search
    assert list(fig.data[0].y) == [t.values[0] for t in study.trials]
    assert len([t for t in search_plots.parallel_coordinates(study).data if t.mode == "lines"]) == 5


def test_search_figures_of_a_study_without_complete_trials_are_empty():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    for draw in (search_plots.optimization_history, search_plots.parallel_coordinates,
                 search_plots.param_importances):
        assert len(draw(study).data) == 0


def test_a_log_size_axis_ticks_in_kib_as_it_is_drawn():
    points = [{"name": n, "run": "r", "run_id": "a", "technique": t, "size_bytes": b,
               "test_accuracy": acc, "chain": ""}
              for n, t, b, acc in (("base", None, 69_000, 0.95), ("dc", "prune", 3_800, 0.94))]
    fig = plots.pareto(points, "size_bytes", "test_accuracy")
    ticks = list(fig.layout.xaxis.tickvals)  # KiB, like the points: 3.7 to 67.4
    assert fig.layout.xaxis.type == "log" and min(ticks) <= 3.7 and max(ticks) >= 67.4
    assert max(ticks) < 1000


def test_a_log_sampled_rate_gets_a_log_axis_in_the_parallel_coordinates():
    """A learning rate sampled on a log scale is drawn on one: its decades are evenly
    spaced along its axis, not squeezed to the bottom of a linear one."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=12)
    fig = search_plots.parallel_coordinates(study)
    at = list(fig.layout.xaxis.ticktext).index("lr")
    ticks = {float(a.text): a.y for a in fig.layout.annotations if a.x == at}
    lo, hi = min(ticks), max(ticks)
    for value, y in ticks.items():  # where a log axis puts each tick
        assert y == pytest.approx(math.log10(value / lo) / math.log10(hi / lo), abs=0.02)
    assert len(ticks) >= 3  # a decade between the ends (linear: 0.01 would sit at 0.11)


def test_a_short_run_has_one_tick_per_epoch():
    fig = plots.curves({"run": {"epoch": [1, 2], "train_loss": [0.2, 0.1],
                                "val_loss": [0.3, 0.2]}}, "loss")
    assert (fig.layout.xaxis.tick0, fig.layout.xaxis.dtick) == (1, 1)
