"""Tune: a search space built by clicking, a sampler, a budget; trials fill in live."""

import json

import streamlit as st

from engine import plots
from engine.optimizers import OPTIMIZERS
from engine.recipe import Recipe
from engine.store import Store
from pages.common import describe, selection, show_error, submit, train_settings
from pages.live import watch

SAMPLERS = {"tpe": "Bayesian (TPE)", "gp": "Bayesian (Gaussian process)", "random": "random",
            "grid": "grid (every combination of the lists)", "nsga2": "NSGA-II (multi-objective)"}

st.title("Tune")
sel = selection()
train_cfg = train_settings()
st.caption(f"Searching around **{describe(sel['model'])}** on **{describe(sel['data'])}** "
           f"with the Train page's other settings.")
left, right = st.columns(2)
with left:
    sampler = st.selectbox("Sampler", list(SAMPLERS), format_func=SAMPLERS.get, key="tu_sampler")
    trials = int(st.number_input("Trials", 1, 500, 12, key="tu_trials"))
    timeout = int(st.number_input("Time budget (s, 0 = none)", 0, 36000, 0, key="tu_timeout"))
    workers = int(st.number_input("Parallel workers", 1, 8, 1, key="tu_workers"))
    validation = st.selectbox("Validation", ["holdout", "kfold", "stratified"], key="tu_val")
    folds = int(st.number_input("Folds", 2, 20, 5, key="tu_folds",
                                disabled=validation == "holdout"))
    pruner = st.selectbox("Trial pruning", ["none", "median", "hyperband"], key="tu_pruner")
with right:
    space = {}
    grid = sampler == "grid"
    if st.checkbox("Learning rate", True, key="tu_lr"):
        space["train.lr"] = [0.001, 0.01, 0.1] if grid else {"low": 1e-4, "high": 0.1,
                                                                "log": True}
    if st.checkbox("Optimizer", False, key="tu_opt"):
        space["train.optimizer"] = st.multiselect("Optimizers", OPTIMIZERS.names(),
                                                  ["sgd", "momentum", "adam"], key="tu_opts")
    if st.checkbox("Hidden layer widths", True, key="tu_hidden"):
        text = st.text_input("Width choices (JSON)", "[[16], [64], [64, 32]]", key="tu_widths")
        space["model.hidden"] = json.loads(text) if text.strip().startswith("[") else []
    if st.checkbox("Weight decay", False, key="tu_wd"):
        space["train.weight_decay"] = [0.0, 1e-4, 1e-2] if grid else {
            "low": 1e-6, "high": 0.1, "log": True}
    if st.checkbox("Dropout", False, key="tu_dropout"):
        space["model.dropout"] = [0.0, 0.2, 0.5] if grid else {"low": 0.0, "high": 0.5}
    objectives = st.multiselect("Objectives", ["val_score", "val_loss", "params",
                                               "latency_ms"], ["val_score"], key="tu_obj",
                                help="More than one: the result is a Pareto front (NSGA-II).")

tune = {"sampler": sampler, "n_trials": trials, "timeout_s": timeout or None,
        "workers": workers, "validation": validation, "folds": folds, "pruner": pruner,
        "space": space, "objectives": objectives}
try:
    recipe = Recipe.from_dict({"data": sel["data"], "model": sel["model"], "train": train_cfg,
                               "tune": tune})
    if st.button("Search", type="primary", key="tu_run", icon=":material/search:"):
        st.session_state["tu_watch"] = submit(recipe, name=f"search {sampler}")
except Exception as exc:
    show_error(exc)

run_id = st.session_state.get("tu_watch")
if run_id:
    store = Store()

    @st.fragment(run_every=1.0)
    def trials_live() -> None:
        found = [e for e in store.events(run_id) if e.get("event") == "trial"]
        st.caption(f"{len(found)} trial(s) finished")
        if found:
            a, b = st.columns(2)
            a.plotly_chart(plots.search_history(found), key="tu_history")
            b.plotly_chart(plots.parallel_coordinates(found), key="tu_parcoords")
        if len(objectives) == 2 and objectives[0] == "val_score":  # the front, as it grows
            points = [{"name": f"trial {t['number']}", "technique": "trial",
                       "chain": str(t["params"]), objectives[0]: t["values"][0],
                       objectives[1]: t["values"][1]}
                      for t in found if t.get("state") == "COMPLETE" and t.get("values")]
            if points:
                st.plotly_chart(plots.pareto(points, objectives[1], objectives[0],
                                             title="Pareto front of the trials"),
                                key="tu_pareto")

    trials_live()
    watch([run_id], key="tu_live")
    tuning = ((store.get_run(run_id) or {}).get("result") or {}).get("tuning")
    if tuning:
        if tuning.get("best_params"):
            best = tuning.get("best_value", (tuning.get("best_values") or [None])[0])
            st.success(f"Best {tuning['objectives'][0]}: {best:.4f} with "
                       f"{tuning['best_params']}; the run trained this winner as its baseline.")
        if tuning.get("importances"):
            st.plotly_chart(plots.importances(tuning["importances"]), key="tu_importances")
        if tuning.get("pareto"):
            st.dataframe([{"trial": t["number"], **t["params"], **dict(zip(
                tuning["objectives"], t["values"], strict=False))} for t in tuning["pareto"]],
                hide_index=True)
