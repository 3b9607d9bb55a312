"""One headless AppTest per page: it renders, its main widgets are there, and a run completes."""

from __future__ import annotations

import json
import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

from engine.store import Store


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", f"sqlite:///{tmp_path}/store.db")
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "artifacts"))


def open_app(page: str | None = "views/data_model.py") -> AppTest:
    """The app on `page` (None: the page it opens on, Home)."""
    at = AppTest.from_file("../app.py", default_timeout=90)
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def open_on_iris(page: str, *, hidden: list[int], **train: object) -> AppTest:
    """The app with iris and a small MLP selected and quick training settings, on `page`."""
    from engine.runner import resolve

    at = AppTest.from_file("../app.py", default_timeout=90)
    defaults = resolve({}).to_dict()
    at.session_state["selection"] = {"data": {**defaults["data"], "source": "builtin:iris"},
                                     "model": {**defaults["model"], "hidden": hidden}}
    at.session_state["train_cfg"] = {**defaults["train"], **train}
    at.run()
    at.switch_page(page).run()
    return at


def chart_titles(at: AppTest) -> list[str]:
    """The titles of the Plotly figures on the page, in order."""
    return [json.loads(c.proto.spec)["layout"].get("title", {}).get("text")
            for c in at.get("plotly_chart")]


def wait_finished(run_id: str, timeout: float = 120) -> dict:
    store = Store()
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = store.get_run(run_id)
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


def test_home_is_the_first_page_and_offers_the_showcase():
    at = open_app(None)
    assert at.title[0].value == "Model optimization workbench"
    assert at.button(key="home_showcase").label == "Showcase"


def test_a_showcase_press_while_the_engine_loads_is_kept_and_launched_once_it_has(
        monkeypatch):
    """Home's button is live before the warm-up has imported the engine: a press is kept
    (the page says so) and the first full run after the load launches it and opens Compare;
    no script of Home waits on the engine's import."""
    import views.warmup
    from engine import showcase

    loaded = {"now": False}
    monkeypatch.setattr(views.warmup, "engine_loaded", lambda: loaded["now"])
    presses = []
    monkeypatch.setattr(showcase, "launch", lambda store: presses.append(store) or
                        showcase.Launch(run_ids=[], submitted=[]))
    at = AppTest.from_file("../app.py", default_timeout=90)
    at.run()
    assert not at.info
    at.button(key="home_showcase").click().run()
    assert not at.exception, at.exception
    assert at.info[0].value.startswith("Starting the showcase as soon as the engine")
    assert presses == []  # nothing launched while the engine loads
    loaded["now"] = True
    at.run()
    assert not at.exception, at.exception
    assert len(presses) == 1
    assert at.title[0].value == "Compare"
    at.run()
    assert len(presses) == 1  # the kept press is carried out once


def test_home_drawn_before_the_engine_loaded_shows_the_whole_pitch_once_it_has(monkeypatch):
    """Home drawn while the engine loads shows the short pitch in a ticking fragment; a tick
    after the load (here: the load lands between the page's check and the fragment's)
    draws the whole one, with the race's optimizers, and the button stays where it was."""
    import views.warmup

    answers = iter([False] * 3)  # the sidebar's, the page's and the fragment's: loading
    monkeypatch.setattr(views.warmup, "engine_loaded", lambda: next(answers, True))
    at = AppTest.from_file("../app.py", default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    assert not any("optimizer race** (" in m.value for m in at.markdown)
    assert any("optimizer race**, then" in m.value for m in at.markdown)
    answers = iter([False] * 2)  # the sidebar and the page: loading; the fragment's tick: in
    at.run()
    assert not at.exception, at.exception
    assert any("optimizer race** (" in m.value for m in at.markdown)
    assert at.button(key="home_showcase")


def test_data_model_page_opens_on_the_builtin_pair():
    at = open_app()
    assert at.title[0].value == "Data & Model"
    assert at.selectbox(key="dm_dataset").value == "digits"
    assert at.selectbox(key="dm_arch").value == "mlp"
    labels = [m.label for m in at.metric]
    for label in ("train rows", "input shape", "parameters", "FLOPs / sample", "size"):
        assert label in labels
    assert at.metric[labels.index("input shape")].value == "1x8x8"
    assert len(at.get("plotly_chart")) == 2  # sample images and class balance


def test_data_model_page_switches_dataset_and_model():
    at = open_app()
    at.selectbox(key="dm_dataset").set_value("breast_cancer").run()
    at.selectbox(key="dm_arch").set_value("cnn").run()
    assert not at.exception and not at.error
    shape = at.metric[[m.label for m in at.metric].index("input shape")].value
    assert shape == "30"
    assert at.session_state["selection"]["data"]["source"] == "builtin:breast_cancer"
    assert at.session_state["selection"]["model"]["source"] == "builtin:cnn"
    at.text_input(key="dm_hidden").input("64, x").run()
    assert "whole numbers" in at.error[0].value  # a bad width is one sentence, not a crash


def test_train_page_lists_every_registered_choice():
    from engine.optimizers import OPTIMIZERS
    from engine.schedules import SCHEDULES

    at = open_app("views/train.py")
    assert at.selectbox(key="tr_opt").options == OPTIMIZERS.names()
    assert at.selectbox(key="tr_sched").options == SCHEDULES.names()
    assert at.button(key="tr_run").label == "Run"
    assert len(at.get("plotly_chart")) == 1  # the learning-rate preview
    at.selectbox(key="tr_opt").set_value("newton").run()
    assert at.number_input(key="tr_lr_newton").value == 1.0  # the optimizer's own default
    assert at.selectbox(key="tr_batch_newton").value == "full"


def test_train_page_starts_from_the_engines_defaults_and_registry_bounds():
    from engine.optimizers import OPTIMIZERS
    from engine.recipe import EarlyStoppingConfig, ScheduleConfig
    from engine.regularization import REGULARIZERS

    at = open_app("views/train.py")
    assert at.selectbox(key="tr_sched").value == ScheduleConfig().name == "constant"
    dropout = REGULARIZERS.get("dropout").param("dropout")
    slider = at.slider(key="tr_dropout")
    assert (slider.min, slider.max) == (dropout.low, dropout.high)
    patience = REGULARIZERS.get("early_stopping").param("patience")
    assert at.number_input(key="tr_patience").value == EarlyStoppingConfig().patience
    assert at.number_input(key="tr_patience").min == patience.low
    assert at.number_input(key="tr_l1").max is None  # the registry sets no upper bound
    # momentum is an ordinary setting of the momentum optimizer, rendered from its Param
    at.selectbox(key="tr_opt").set_value("momentum").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    field = at.number_input(key="tr_opt_momentum_momentum")
    assert field.value == OPTIMIZERS.get("momentum").param("momentum").default == 0.9
    field.set_value(0.5).run()
    cfg = at.session_state["train_cfg"]
    assert cfg["optimizer_options"] == {"momentum": 0.5}
    assert cfg["momentum"] is None  # the deprecated train.momentum is never sent


@pytest.mark.slow
def test_train_page_runs_digits_and_shows_the_curve():
    at = open_app("views/train.py")
    at.number_input(key="tr_epochs").set_value(3).run()
    at.button(key="tr_run").click().run()
    assert not at.exception and not at.error
    [run_id] = at.session_state["watch"]
    run = wait_finished(run_id)
    assert run["status"] == "done", run.get("error")
    at.run()
    assert not at.exception
    assert "epoch 3 of 3" in at.get("progress")[0].proto.text
    assert len(at.get("plotly_chart")) == 3  # preview + live loss + live accuracy
    assert len(Store().history(run_id)["epoch"]) == 3


@pytest.mark.slow
def test_train_page_race_starts_one_run_per_optimizer():
    at = open_app("views/train.py")
    at.number_input(key="tr_epochs").set_value(2).run()
    at.toggle(key="tr_race").set_value(True).run()
    at.multiselect(key="tr_race_pick").set_value(["sgd", "adam"]).run()
    at.button(key="tr_run").click().run()
    ids = at.session_state["watch"]
    assert len(ids) == 2
    runs = [wait_finished(i) for i in ids]
    assert [r["status"] for r in runs] == ["done", "done"]
    assert runs[0]["group_id"] == runs[1]["group_id"]
    assert {r["recipe"]["train"]["optimizer"] for r in runs} == {"sgd", "adam"}


@pytest.mark.slow
def test_runs_page_empty_then_lists_a_run():
    at = open_app("views/runs.py")
    assert "No runs yet" in at.info[0].value
    from engine import jobs

    run_id = jobs.submit({"data": {"source": "builtin:iris"}, "train": {"epochs": 2}},
                         name="iris quick")
    wait_finished(run_id)
    at.run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["name"]) == ["iris quick"]
    assert "done" in table["status"][0]


def test_data_model_page_takes_an_uploaded_table_and_its_target():
    at = open_app()
    at.radio(key="dm_data_kind").set_value("Upload").run()
    rows = "\n".join(f"{i % 7},{(i * 3) % 5},{'ab'[i % 2]},{'yes' if i % 3 else 'no'}"
                     for i in range(60))
    at.file_uploader(key="dm_data_file").upload("t.csv", f"a,b,colour,label\n{rows}\n".encode(),
                                                "text/csv").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="dm_target").options == ["a", "b", "colour", "label"]
    assert at.selectbox(key="dm_target").value == "label"  # the last column by default
    assert at.session_state["selection"]["data"]["source"].endswith("_t.csv")
    shape = at.metric[[m.label for m in at.metric].index("input shape")].value
    assert shape == "4"  # a, b and the one-hot colour
    assert any("3 columns become 4 inputs" in c.value and "colour into 2 (a, b)" in c.value
               for c in at.caption)  # the encoding is said where the data is chosen
    at.selectbox(key="dm_target").set_value("a").run()
    assert not at.exception
    assert at.session_state["selection"]["data"]["target"] == "a"


def test_a_pickle_uploaded_as_a_model_is_one_sentence_on_the_page():
    import pickle

    at = open_app()
    at.radio(key="dm_model_kind").set_value("Upload").run()
    at.file_uploader(key="dm_model_file").upload("m.pt", pickle.dumps({"a": 1})).run()
    at.selectbox(key="dm_state_arch").set_value("mlp").run()
    assert not at.exception
    assert any("never loaded" in e.value for e in at.error)


@pytest.mark.slow
def test_a_killed_worker_shows_as_failed_with_its_history_after_an_app_restart():
    import os
    import signal

    from engine import jobs

    run_id = jobs.submit({"data": {"source": "builtin:digits"},
                          "train": {"epochs": 5000, "early_stopping": None}}, name="doomed")
    store = Store()
    deadline = time.time() + 90
    while len(store.history(run_id).get("epoch", [])) < 2:
        assert time.time() < deadline, "the worker never trained"
        time.sleep(0.2)
    os.killpg(store.get_run(run_id)["pid"], signal.SIGKILL)
    time.sleep(0.5)
    at = open_app("views/runs.py")  # a fresh app: it reaps at start-up and on this page
    table = at.dataframe[0].value
    assert list(table["status"]) == ["failed"]
    run = Store().get_run(run_id)
    assert "killed or crashed" in run["error"]
    assert len(Store().history(run_id)["epoch"]) >= 2


def chain_to_the_end(at: AppTest) -> dict:
    """Run the Compress page's chain without the heatmap and wait for its run to finish."""
    at.checkbox(key="cmp_sens").uncheck().run()
    at.button(key="cmp_run_btn").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    [run_id] = at.session_state["cmp_watch"]
    run = wait_finished(run_id, timeout=240)
    assert run["status"] == "done", run.get("error")
    return run


def test_compress_form_shows_only_the_settings_that_do_something():
    at = open_app("views/compress.py")
    at.selectbox(key="cmp_tech").set_value("quantize").run()
    keys = lambda: {w.key for w in [*at.number_input, *at.selectbox, *at.checkbox]}  # noqa: E731
    assert "cmp_tech_quantize_calibration_rows" in keys()  # static_int8, the default
    assert not {"cmp_tech_quantize_bits", "cmp_tech_quantize_finetune_epochs",
                "cmp_tech_quantize_correct"} & keys()
    at.selectbox(key="cmp_tech_quantize_method").set_value("uniform").run()
    assert {"cmp_tech_quantize_bits", "cmp_tech_quantize_finetune_epochs",
            "cmp_tech_quantize_correct"} <= keys()
    assert "cmp_tech_quantize_calibration_rows" not in keys()
    at.button(key="cmp_add").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    step = at.session_state["cmp_chain"][-1]
    assert step["method"] == "uniform" and step["bits"] == 8
    at.selectbox(key="cmp_tech").set_value("prune").run()
    assert "cmp_tech_prune_curvature" not in keys() and "cmp_tech_prune_steps" not in keys()
    at.selectbox(key="cmp_tech_prune_method").set_value("obd").run()
    assert "cmp_tech_prune_curvature" in keys()


def test_half_typed_json_in_a_setting_is_a_sentence_and_keeps_add_step_disabled():
    at = open_app("views/compress.py")
    at.selectbox(key="cmp_tech").set_value("distill").run()
    at.text_input(key="cmp_tech_distill_student").set_value("{").run()
    assert not at.exception
    assert any("Student must be JSON" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="cmp_add").disabled
    at.text_input(key="cmp_tech_distill_student").set_value("{}").run()
    assert not at.error and not at.button(key="cmp_add").disabled


def test_run_stays_on_the_page_disabled_while_the_chain_cannot_run():
    at = open_app("views/compress.py")
    at.session_state["cmp_chain"] = [{"technique": "prune", "amount": 7}]
    at.run()
    assert not at.exception and at.error
    assert at.button(key="cmp_run_btn").disabled
    assert "amount of step 1 (prune)" in at.error[0].value  # not compress[0].amount
    assert "compress[" not in at.error[0].value


@pytest.mark.slow
def test_compress_page_builds_a_chain_and_runs_it():
    at = open_app("views/compress.py")
    from engine.compress import load_all

    assert at.selectbox(key="cmp_tech").options == load_all().names()
    assert len(at.session_state["cmp_chain"]) == 1  # a magnitude-pruning step to start with
    at.selectbox(key="cmp_tech").set_value("quantize").run()
    at.selectbox(key="cmp_tech_quantize_method").set_value("uniform").run()
    at.button(key="cmp_add").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [s["technique"] for s in at.session_state["cmp_chain"]] == ["prune", "quantize"]
    run = chain_to_the_end(at)
    names = [v["name"] for v in Store().variants(run["id"])]
    assert names == ["baseline", "prune-magnitude", "quantize-uniform"]
    at.run()
    assert not at.exception


@pytest.mark.slow
def test_compare_page_draws_both_fronts():
    from engine import jobs

    at = open_app("views/compare.py")
    assert "No finished runs" in at.info[0].value
    run_id = jobs.submit({"data": {"source": "builtin:iris"},
                          "model": {"source": "builtin:mlp", "hidden": [16]},
                          "train": {"epochs": 20},
                          "compress": [{"technique": "prune", "amount": 0.5,
                                        "finetune_epochs": 1},
                                       {"technique": "quantize", "method": "fp16"}]})
    assert wait_finished(run_id, timeout=240)["status"] == "done"
    at.run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 2
    table = at.dataframe[0].value
    assert list(table["variant"]) == ["baseline", "prune-magnitude", "quantize-fp16"]
    assert table["smaller by (x)"][2] > 1.5  # pruned, then fp16: smaller than the baseline


@pytest.mark.slow
def test_deploy_page_exports_a_run_and_offers_the_file_and_snippet():
    from engine import jobs

    at = open_app("views/deploy.py")
    assert "No finished runs" in at.info[0].value
    run_id = jobs.submit({"data": {"source": "builtin:iris"}, "train": {"epochs": 5},
                          "compress": [{"technique": "quantize", "method": "dynamic_int8"}]})
    assert wait_finished(run_id, timeout=240)["status"] == "done"
    at.run()
    at.button(key="dep_export").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["variant"]) == ["baseline", "quantize-dynamic_int8"]
    assert bool(table["matches PyTorch"][0])
    stored = [v["metrics"] for v in Store().variants(run_id)]  # one latency, every page
    assert list(table["latency ms"]) == [m["latency_ms"] for m in stored]
    assert table["speedup"][1] == stored[1]["speedup"]
    assert 'session.run(None, {"input": x})' in at.code[0].value
    assert "CLASSES" in at.code[0].value


@pytest.mark.slow
def test_diagnose_page_runs_and_shows_the_verdict_and_curves():
    from engine.recipe import BiasVarianceConfig, LandscapeConfig, LearningCurveConfig

    at = open_on_iris("views/diagnose.py", hidden=[16], epochs=15, lr=0.01)
    assert not at.exception and not at.error, [e.value for e in at.error]
    # every default is the recipe's: 20 rounds, its fractions, no landscape unless asked
    assert at.number_input(key="dg_rounds").value == BiasVarianceConfig().rounds == 20
    assert at.multiselect(key="dg_fractions").value == list(LearningCurveConfig().fractions)
    assert at.selectbox(key="dg_knob").value == "model.hidden"
    assert not at.checkbox(key="dg_ls").value
    assert at.number_input(key="dg_ls_points").value == LandscapeConfig().points
    at.checkbox(key="dg_ls").check().run()
    at.number_input(key="dg_ls_points").set_value(5).run()
    at.number_input(key="dg_rounds").set_value(3).run()
    at.multiselect(key="dg_fractions").set_value([0.25, 1.0]).run()
    at.button(key="dg_run").click().run()
    run = wait_finished(at.session_state["dg_watch"], timeout=300)
    assert run["status"] == "done", run.get("error")
    at.run()
    assert not at.exception
    verdicts = [e.value for e in at.warning] + [e.value for e in at.success]
    assert any(v.startswith(("High bias", "High variance", "Good fit")) for v in verdicts)
    assert len(at.get("plotly_chart")) >= 3 + 2  # live curves + learning, decomposition, ...
    assert any(t and t.startswith("loss landscape") for t in chart_titles(at))
    assert "fits random labels" in [m.label for m in at.metric]
    assert run["recipe"]["diagnose"]["landscape"]["points"] == 5


def search_to_the_end(at: AppTest) -> dict:
    """Press the Tune page's Run, wait for the search's run to finish, redraw the page."""
    at.button(key="tu_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = wait_finished(at.session_state["tu_watch"], timeout=300)
    assert run["status"] == "done", run.get("error")
    at.run()
    assert not at.exception
    return run


def test_tune_page_starts_from_the_engines_defaults():
    from engine.tune import DEFAULTS, OBJECTIVES, PRUNERS, SAMPLERS, VALIDATIONS

    at = open_app("views/tune.py")
    assert at.number_input(key="tu_trials").value == DEFAULTS["n_trials"] == 20
    assert at.selectbox(key="tu_sampler").value == DEFAULTS["sampler"]
    assert len(at.selectbox(key="tu_sampler").options) == len(SAMPLERS)
    for key, names, default in (("tu_val", VALIDATIONS, "validation"),
                                ("tu_pruner", PRUNERS, "pruner")):
        assert at.selectbox(key=key).options == list(names)
        assert at.selectbox(key=key).value == DEFAULTS[default]
    assert at.number_input(key="tu_folds").value == DEFAULTS["folds"]
    assert at.number_input(key="tu_workers").value == DEFAULTS["workers"]
    assert at.multiselect(key="tu_obj").value == list(DEFAULTS["objectives"])
    assert len(at.multiselect(key="tu_obj").options) == len(OBJECTIVES)
    at.selectbox(key="tu_sampler").set_value("grid").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with pytest.raises(KeyError):  # the grid sets its own number of trials
        at.number_input(key="tu_trials")
    assert any("9 combination" in c.value for c in at.caption)  # 3 rates x 3 widths


def test_a_half_typed_width_list_is_one_sentence_and_search_waits_for_it():
    at = open_app("views/tune.py")
    at.text_input(key="tu_widths").set_value("[[16], [64").run()
    assert not at.exception
    assert [e.value for e in at.error] == ["The box 'Width choices (JSON)' needs a JSON list "
                                           "such as [[16], [64, 32]]; '[[16], [64' is not "
                                           "one yet."]
    assert at.button(key="tu_run").disabled
    at.text_input(key="tu_widths").set_value("[[16], [64]]").run()
    assert not at.exception and not at.error and not at.button(key="tu_run").disabled


@pytest.mark.slow
def test_tune_page_waits_with_a_caption_until_a_trial_completes():
    from engine import jobs

    run_id = jobs.submit({"data": {"source": "builtin:iris"}, "train": {"epochs": 1}},
                         name="no trials")
    assert wait_finished(run_id)["status"] == "done"
    at = open_app("views/tune.py")
    at.session_state["tu_watch"] = run_id
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("once a trial completes" in c.value for c in at.caption)
    assert "optimization history" not in chart_titles(at)


@pytest.mark.slow
def test_tune_page_runs_a_small_search_to_completion():
    at = open_on_iris("views/tune.py", hidden=[8], epochs=5, early_stopping=None)
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.selectbox(key="tu_sampler").set_value("random").run()
    at.number_input(key="tu_trials").set_value(3).run()
    run = search_to_the_end(at)
    tuning = run["result"]["tuning"]
    assert len(tuning["trials"]) == 3
    assert any("Best" in s.value for s in at.success)
    assert len(at.get("plotly_chart")) >= 4  # history, parameters, live loss and accuracy
    titles = chart_titles(at)
    assert {"optimization history", "parameters of every trial"} <= set(titles)
    history = at.get("plotly_chart")[titles.index("optimization history")]
    [trials, _] = json.loads(history.proto.spec)["data"]  # drawn from the stored study
    assert trials["y"] == [t["values"][0] for t in tuning["trials"]]
    assert not tuning["importances"]  # 3 trials: too few for importances, and it says so
    assert "at least 10 complete trials" in tuning["importances_note"]
    assert any(tuning["importances_note"] == c.value for c in at.caption)
    table = next(d.value for d in at.dataframe if "trial" in d.value)  # best first, readable
    assert list(table["val_score"]) == sorted(table["val_score"], reverse=True)
    from engine.tune import winner

    shown = next(s.value for s in at.success if "Best" in s.value)
    assert winner(tuning) in shown and "model.hidden = [" in shown


@pytest.mark.slow
def test_tune_page_draws_the_pareto_front_of_a_two_objective_search():
    at = open_on_iris("views/tune.py", hidden=[8], epochs=3, early_stopping=None)
    at.selectbox(key="tu_sampler").set_value("nsga2").run()
    at.number_input(key="tu_trials").set_value(4).run()
    at.multiselect(key="tu_obj").set_value(["val_score", "params"]).run()
    run = search_to_the_end(at)
    assert run["result"]["tuning"]["pareto"]
    assert len(at.get("plotly_chart")) >= 5  # history, parameters, front, live curves
    assert {"optimization history", "parameters of every trial",
            "Pareto front of the trials"} <= set(chart_titles(at))


@pytest.mark.slow
def test_compress_page_starts_from_a_finished_runs_model():
    from engine import jobs

    first = jobs.submit({"data": {"source": "builtin:iris"},
                         "model": {"source": "builtin:mlp", "hidden": [16]},
                         "train": {"epochs": 20, "lr": 0.01}}, name="to compress")
    assert wait_finished(first)["status"] == "done"
    at = open_app("views/compress.py")
    at.radio(key="cmp_start").set_value("A finished run's model").run()
    run = chain_to_the_end(at)
    variants = Store().variants(run["id"])
    assert [v["name"] for v in variants] == ["baseline", "prune-magnitude"]
    assert variants[0]["metrics"]["epochs_run"] == 0  # the run's model, not retrained
    original = Store().variants(first)[0]["metrics"]["test_accuracy"]
    assert variants[0]["metrics"]["test_accuracy"] == original


@pytest.mark.slow
def test_two_sessions_each_see_their_own_runs_and_compare_fans_out():
    a = open_on_iris("views/compress.py", hidden=[8], epochs=2)
    b = open_on_iris("views/compress.py", hidden=[8], epochs=2)
    a.session_state["cmp_chain"] = [
        {"technique": "prune", "method": "magnitude", "amount": 0.5, "finetune_epochs": 1},
        {"technique": "quantize", "method": "dynamic_int8"}]
    a.run()
    a.button(key="cmp_each_btn").click().run()  # one run per step, side by side
    b.button(key="cmp_run_btn").click().run()
    assert not a.exception and not b.exception, (a.exception, b.exception)
    ids_a, [id_b] = a.session_state["cmp_watch"], b.session_state["cmp_watch"]
    assert len(ids_a) == 2 and id_b not in ids_a
    store = Store()
    assert store.get_run(ids_a[0])["group_id"] == store.get_run(ids_a[1])["group_id"]
    for run_id in [*ids_a, id_b]:
        assert wait_finished(run_id)["status"] == "done"
    for at, names in ((a, ["quantize · mlp on iris", "prune · mlp on iris"]),
                      (b, ["prune · mlp on iris"])):  # names say the data and the model
        at.switch_page("views/runs.py").run()
        assert len(at.dataframe[0].value) == 3  # everyone's runs by default
        at.toggle(key="runs_mine").set_value(True).run()
        assert list(at.dataframe[0].value["name"]) == names  # newest first


def test_runs_page_says_a_bad_backend_setting_in_one_sentence(monkeypatch):
    monkeypatch.setenv("WORKBENCH_BACKEND", "kubernetes")
    at = open_app(None)
    at.switch_page("views/runs.py").run()
    assert not at.exception
    assert "The backend 'kubernetes' is unknown" in at.error[0].value


@pytest.mark.slow
def test_a_reload_opens_the_same_workspace_from_the_url():
    """A reload is a new browser session on the same URL: ?ws= names the workspace, whose
    selection, Train settings and watched run come back from the store."""
    first = open_on_iris("views/train.py", hidden=[8], epochs=2, early_stopping=None)
    first.button(key="tr_run").click().run()
    assert not first.exception, first.exception
    ws = first.query_params["ws"]
    [run_id] = first.session_state["watch"]
    assert wait_finished(run_id)["status"] == "done"

    again = AppTest.from_file("../app.py", default_timeout=90)  # the reload: nothing in memory
    again.query_params["ws"] = ws
    again.run()
    again.switch_page("views/train.py").run()
    assert not again.exception and not again.error, [e.value for e in again.error]
    assert again.session_state["watch"] == [run_id]  # the live view is back, with its run
    assert again.session_state["selection"]["data"]["source"] == "builtin:iris"
    assert again.number_input(key="tr_epochs").value == 2
    mine = Store().list_runs(owner=ws)  # the run is still this workspace's own
    assert [r["id"] for r in mine] == [run_id]

    other = open_app("views/train.py")  # a new URL is a new, empty workspace
    assert other.query_params["ws"] != ws and "watch" not in other.session_state


def test_a_refused_table_never_becomes_the_selection_and_its_message_names_the_page():
    at = open_app()
    at.radio(key="dm_data_kind").set_value("Upload").run()
    rows = "\n".join(f"{i},{i % 3},yes" for i in range(30))  # the label never varies
    at.file_uploader(key="dm_data_file").upload("flat.csv", f"a,b,label\n{rows}\n".encode(),
                                                "text/csv").run()
    assert not at.exception
    assert [e.value for e in at.error] == [  # once
        "The target has a single class (yes in all 30 rows); a classifier needs at least 2 "
        "classes, pick another target column."]
    assert at.session_state["selection"]["data"]["source"] == "builtin:digits"
    assert any("Nothing changed" in c.value for c in at.caption)

    holes = "a,b,label\n1,,x\n2,3,y\n" + "\n".join(f"{i},{i},{'xy'[i % 2]}" for i in range(30))
    at.file_uploader(key="dm_data_file").upload("holes.csv", holes.encode(), "text/csv").run()
    [message] = [e.value for e in at.error]  # once, naming the box and the file as uploaded
    assert "\u201cMissing values\u201d" in message and "data.missing" not in message
    assert "'holes.csv'" in message
    at.selectbox(key="dm_missing").set_value("drop").run()
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["selection"]["data"]["source"].endswith("_holes.csv")


def test_a_state_dict_upload_asks_for_its_architecture_and_sizes_on_the_spot():
    import io

    import torch

    from engine.models import build_model
    from engine.runner import resolve

    net = build_model(resolve({"model": {"hidden": [8]}}).model, (4,), 3, seed=0)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    at = open_on_iris("views/data_model.py", hidden=[128, 64])
    at.radio(key="dm_model_kind").set_value("Upload").run()
    at.file_uploader(key="dm_model_file").upload("weights.pt", buffer.getvalue(),
                                                 "application/octet-stream").run()
    assert "\u201cArchitecture of a state_dict\u201d" in at.error[0].value  # the box, named
    at.selectbox(key="dm_state_arch").set_value("mlp").run()
    assert at.text_input(key="dm_hidden").value == "128, 64"  # asked here, with the sizes
    at.text_input(key="dm_hidden").set_value("8").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    model = at.session_state["selection"]["model"]
    assert model["architecture"] == "mlp" and model["hidden"] == [8]
    assert model["source"].endswith("_weights.pt")


def test_the_page_settings_come_back_after_a_reload():
    first = open_app("views/tune.py")
    first.number_input(key="tu_trials").set_value(7).run()
    first.checkbox(key="tu_train.weight_decay").check().run()
    first.switch_page("views/diagnose.py").run()
    first.number_input(key="dg_rounds").set_value(9).run()
    first.switch_page("views/compress.py").run()
    first.checkbox(key="cmp_sens").uncheck().run()
    first.switch_page("views/train.py").run()  # any rerun saves the workspace
    first.number_input(key="tr_seed").set_value(7).run()
    first.slider(key="tr_dropout").set_value(0.25).run()
    first.toggle(key="tr_race").set_value(True).run()
    ws = first.query_params["ws"]

    again = AppTest.from_file("../app.py", default_timeout=90)  # the reload
    again.query_params["ws"] = ws
    again.run()
    again.switch_page("views/train.py").run()
    assert again.number_input(key="tr_seed").value == 7
    assert again.slider(key="tr_dropout").value == 0.25 and again.toggle(key="tr_race").value
    again.switch_page("views/compress.py").run()
    assert not again.checkbox(key="cmp_sens").value
    again.switch_page("views/tune.py").run()
    assert not again.exception and not again.error, [e.value for e in again.error]
    assert again.number_input(key="tu_trials").value == 7
    assert again.checkbox(key="tu_train.weight_decay").value
    again.switch_page("views/diagnose.py").run()
    assert again.number_input(key="dg_rounds").value == 9
    assert not again.warning  # restored as starting values, not forced into widget state


@pytest.mark.slow
def test_a_real_architecture_shows_what_works_on_it():
    at = open_app()
    at.selectbox(key="dm_dataset").set_value("shapes").run()
    at.radio(key="dm_model_kind").set_value("Real architecture").run()
    at.selectbox(key="dm_hfarch").set_value("vit-tiny").run()
    assert not at.exception and not at.error
    assert at.session_state["selection"]["model"]["source"] == "hfarch:vit-tiny"
    table = next(d.value for d in at.dataframe if "why not, or the catch" in d.value.columns)
    row = table[table["technique"] == "prune structured"].iloc[0]
    assert row["status"] == "works"  # heads and MLP neurons of its transformer layers
    assert (table[table["technique"] == "lowrank svd"]["status"] == "works").all()
    fp16 = table[table["technique"] == "quantize fp16"].iloc[0]
    if not torch.cuda.is_available():
        assert fp16["status"] == "works, no faster" and "no GPU" in fp16["why not, or the catch"]


def test_a_zipped_hugging_face_folder_is_a_model_and_pickled_weights_are_refused(tmp_path):
    import io
    import zipfile

    import transformers

    config = transformers.ResNetConfig(num_labels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic")
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(
        tmp_path / "r")
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        for f in (tmp_path / "r").iterdir():
            zf.write(f, f"resnet/{f.name}")
    at = open_app()
    at.selectbox(key="dm_dataset").set_value("shapes").run()
    at.radio(key="dm_model_kind").set_value("Upload").run()
    at.file_uploader(key="dm_model_file").upload("resnet.zip", blob.getvalue()).run()
    assert not at.exception and not at.error
    assert at.session_state["selection"]["model"]["source"].startswith("hf:")
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("pytorch_model.bin", b"\x80\x04K\x01.")
    at.file_uploader(key="dm_model_file").upload("bad.zip", bad.getvalue()).run()
    assert any("pickled weights, which are never loaded" in e.value for e in at.error)
    assert at.session_state["selection"]["model"]["source"].startswith("hf:")  # kept


def test_an_onnx_models_train_page_offers_evaluation_not_optimizers(tmp_path):
    import torch

    from engine.export import onnx_bytes
    from engine.models import build_model
    from engine.recipe import ModelConfig

    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)
    at = open_app()
    at.selectbox(key="dm_dataset").set_value("iris").run()
    at.radio(key="dm_model_kind").set_value("Upload").run()
    with torch.no_grad():
        blob = onnx_bytes(model, (4,))
    at.file_uploader(key="dm_model_file").upload("m.onnx", blob).run()
    assert not at.error
    at.switch_page("views/train.py").run()
    assert any("runs in ONNX Runtime only" in i.value for i in at.info)
    assert not [s for s in at.selectbox if s.key == "tr_opt"]
    assert at.button(key="tr_onnx_run")


@pytest.mark.slow
def test_auto_compress_searches_within_the_budget_and_deploys_its_recommendation():
    from engine.autocompress import DEFAULT_TECHNIQUES, OBJECTIVE_LABELS, OBJECTIVES

    at = open_on_iris("views/compress.py", hidden=[16], epochs=30, lr=0.01)
    at.radio(key="ac_mode").set_value("Auto-compress: search within a budget").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.radio(key="ac_objective").options == [OBJECTIVE_LABELS[o] for o in OBJECTIVES]
    assert at.multiselect(key="ac_tech_size").value == list(DEFAULT_TECHNIQUES["size"])  # engine's
    assert at.number_input(key="ac_points").value == 1.0
    at.multiselect(key="ac_tech_size").set_value([]).run()
    assert at.button(key="ac_run_btn").disabled  # nothing to chain: said, not run
    at.multiselect(key="ac_tech_size").set_value(["prune", "share"]).run()
    at.number_input(key="ac_points").set_value(5.0).run()
    at.number_input(key="ac_trials").set_value(4).run()
    at.number_input(key="ac_epochs").set_value(2).run()
    at.button(key="ac_run_btn").click().run()
    assert not at.exception, at.exception
    run = wait_finished(at.session_state["ac_watch"][0], timeout=300)
    assert run["status"] == "done", run.get("error")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    section = Store().get_run(run["id"])["result"]["autocompress"]
    assert "Points lost vs size of the shipped file, one dot per trial" in chart_titles(at)
    assert section["recommended"] == "autocompress"  # iris at 5 points: trial 0 meets it
    found = next(v for v in Store().variants(run["id"]) if v["name"] == "autocompress")
    words = " ".join(s.value for s in at.success)
    assert f"{found['metrics']['size_bytes']:,} bytes" in words  # the harness's figure
    at.button(key=f"ac_{run['id']}_deploy_btn").click().run()
    assert not at.exception
    assert at.selectbox(key="dep_run").value["id"] == run["id"]  # Deploy opens on it
