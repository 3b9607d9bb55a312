"""Plot builders: assert on the records they draw, and that figures carry units."""

from __future__ import annotations

import math

import numpy as np

from engine import plots


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


def test_lr_schedule_and_class_balance():
    fig = plots.lr_schedule([0.1, 0.05, 0.025])
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [0.1, 0.05, 0.025]
    records = plots.class_balance_records({"a": 3, "b": 1})
    assert records == [{"class": "a", "count": 3, "share": 0.75},
                       {"class": "b", "count": 1, "share": 0.25}]
    assert plots.class_balance({"a": 3, "b": 1}).data[0].text == ("75%", "25%")


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
    imp = plots.importances({"lr": 0.7, "wd": 0.3})
    for fig in (bv, imp):
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
