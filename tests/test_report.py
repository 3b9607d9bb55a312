"""The standalone report: built from stored runs, it names every variant and the machine,
inlines plotly.js and loads nothing from a network; the shared table and point records."""

from __future__ import annotations

import html.parser
import platform
import re

import pytest

from engine import comparison, report, worker
from engine.errors import UserError
from engine.store import Store

IRIS = {"seed": 0, "data": {"source": "builtin:iris"},
        "model": {"source": "builtin:mlp", "hidden": [16]},
        "train": {"epochs": 15, "lr": 0.01}}
CHAIN = {**IRIS, "compress": [{"technique": "prune", "amount": 0.5, "finetune_epochs": 2},
                              {"technique": "quantize", "method": "fp16"}],
         "diagnose": {"learning_curve": {"fractions": [0.5, 1.0], "repeats": 1},
                      "bias_variance": {"rounds": 2}, "complexity": False}}
SGD = {**IRIS, "train": {**IRIS["train"], "optimizer": "sgd", "lr": None}}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Three finished runs, run in this process by the worker's own function (no process
    start-up): a chain with diagnostics, a second run of the same baseline, an SGD run."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_ARTIFACTS", str(root / "art"))
        mp.setenv("WORKBENCH_STORE", f"sqlite:///{root}/s.db")  # run_worker sets it too
        store = Store()
        ids = {}
        for name, recipe in (("iris chain", CHAIN), ("iris again", {**IRIS, "compress": [
                {"technique": "lowrank", "rank_fraction": 0.5, "finetune_epochs": 1}]}),
                ("iris sgd", SGD)):
            ids[name] = store.create_run(recipe, name=name)
            code = worker.run_worker(ids[name], store.url)
            assert code == 0, store.get_run(ids[name])["error"]
        yield store, ids


class Links(html.parser.HTMLParser):
    """Every src and href of a real tag (text inside <script> is not parsed as tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("src", "href")]


def test_report_is_standalone_and_names_every_variant_and_the_machine(stored, tmp_path):
    store, ids = stored
    path = report.write(store, list(ids.values()), tmp_path / "r.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for name in ("iris chain", "iris again", "iris sgd", "baseline", "prune-magnitude",
                 "quantize-fp16", "lowrank-svd"):
        assert name in text, name
    assert platform.platform() in text  # the machine the runs were measured on
    assert "Measured on" in text and "torch " in text
    parser = Links()
    parser.feed(text)
    external = [u for u in parser.urls if re.match(r"\s*(https?:)?//", u[2])]
    assert external == []  # nothing to fetch: opens offline
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+stylesheet", text)
    assert text.count("Plotly.newPlot") >= 5  # pareto x2, curves, fine-tuning, diagnostics
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # the library inlined, once
    assert '"technique": "prune"' in text  # the recipes, pretty-printed JSON
    assert "What to try next" in text and "learning curve" in text  # diagnostics, verdict


def test_variant_recipes_cut_the_chain_after_their_step():
    recipe = {"compress": [{"technique": "prune"}, {"technique": "quantize"}]}
    assert comparison.variant_recipe(recipe, 0)["compress"] == []
    assert comparison.variant_recipe(recipe, 1)["compress"] == [{"technique": "prune"}]
    assert len(recipe["compress"]) == 2  # the run's recipe is left as it was


def test_points_show_a_shared_baseline_once_and_the_table_has_units(stored):
    store, ids = stored
    run_ids = list(ids.values())
    points = comparison.variant_points(store, run_ids)
    assert [(p["run"], p["name"]) for p in points] == [
        ("iris chain", "baseline"), ("iris chain", "prune-magnitude"),
        ("iris chain", "quantize-fp16"), ("iris again", "lowrank-svd"),
        ("iris sgd", "baseline")]
    every = comparison.variant_points(store, run_ids, one_baseline=False)
    assert len(every) == len(points) + 1
    rows = comparison.table_records(points)
    assert {"size (KiB)", "latency p50 (ms, batch 1)", "test accuracy"} <= set(rows[0])
    assert any(r["Pareto-optimal (size)"] for r in rows)
    assert set(comparison.training_histories(store, run_ids)) == {"iris chain", "iris sgd"}
    figs = comparison.figures(store, run_ids)
    assert set(figs) == {"pareto_size", "pareto_latency", "training_loss"}
    assert "KiB" in figs["pareto_size"].layout.xaxis.title.text


def test_an_empty_or_unknown_selection_is_one_sentence(stored):
    store, _ = stored
    with pytest.raises(UserError, match="at least one run"):
        report.build(store, [])
    with pytest.raises(UserError, match="no run 'nope'"):
        report.build(store, ["nope"])


@pytest.mark.slow
def test_png_export_of_the_main_figures(stored, tmp_path):
    import shutil
    from pathlib import Path

    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    store, ids = stored
    files = report.export_png(store, list(ids.values()), tmp_path)
    assert sorted(f.name for f in files) == ["pareto_latency.png", "pareto_size.png",
                                             "training_loss.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000


def test_runs_on_different_data_never_share_a_front_and_the_headline_reads(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db", artifacts=tmp_path / "art")
    chain = [{"technique": "prune", "amount": 0.5, "finetune_epochs": 0}]
    ids = {}
    for name, source in (("iris chain", "builtin:iris"), ("moons chain", "builtin:moons")):
        ids[name] = store.create_run({"data": {"source": source}, "train": {"epochs": 2},
                                      "compress": chain}, name=name)
        assert worker.run_worker(ids[name], store.url, artifacts=store.artifacts) == 0
    groups = comparison.data_groups(store, list(ids.values()))
    assert groups == {"iris": [ids["iris chain"]], "moons": [ids["moons chain"]]}
    lines = comparison.headline(store, [ids["moons chain"]])
    assert len(lines) == 1 and lines[0].startswith("prune-magnitude (moons chain): ")
    assert "x smaller" in lines[0] and "points" in lines[0]
    assert "In one line each" in report.build(store, [ids["moons chain"]])
    runs = store.list_runs()  # newest first: the moons chain, in no group
    assert comparison.default_selection(runs, store) == [ids["moons chain"]]
