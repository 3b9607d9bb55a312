"""Tune: a search space built by clicking, a sampler, a budget; trials fill in live."""

import math
from typing import Any

import streamlit as st

from engine import plots, search_plots
from engine.errors import UserError
from engine.optimizers import OPTIMIZERS
from engine.runner import resolve
from engine.schema import json_list
from engine.showcase import RACE
from engine.store import ACTIVE, Store
from engine.tune import (
    DEFAULTS,
    MULTI_OBJECTIVE_SAMPLERS,
    OBJECTIVES,
    PRESETS,
    PRUNERS,
    SAMPLER_LABELS,
    SAMPLERS,
    VALIDATIONS,
    load_study,
    ranked_trials,
    winner,
)
from pages.common import (
    describe,
    selection,
    show_error,
    submit,
    train_settings,
)
from pages.live import watch
from pages.workspace import kept, remember, save_workspace


def pick(label: str, names: tuple[str, ...], default: str, key: str, **kwargs: Any) -> str:
    """A selectbox over the engine's names, starting at the engine's default."""
    value = kept(key, default)
    return st.selectbox(label, names, index=names.index(value if value in names else default),
                        key=key, **kwargs)


st.title("Tune")
save_workspace()  # this page's settings as the last change left them: a reload keeps them
sel = selection()
train_cfg = train_settings()
st.caption(f"Searching around **{describe(sel['model'])}** on **{describe(sel['data'])}** "
           f"with the Train page's other settings.")
left, right = st.columns(2)
with left:
    sampler = pick("Sampler", SAMPLERS, DEFAULTS["sampler"], "tu_sampler",
                   format_func=lambda s: SAMPLER_LABELS.get(s, s))
    trials_slot = st.empty()  # filled below: the grid's size depends on the space
    timeout = int(st.number_input("Time budget (s, 0 = none)", 0, 36000,
                                  kept("tu_timeout", 0), key="tu_timeout"))
    workers = int(st.number_input("Parallel workers", 1, 8,
                                  kept("tu_workers", DEFAULTS["workers"]), key="tu_workers"))
    validation = pick("Validation", VALIDATIONS, DEFAULTS["validation"], "tu_val")
    folds = int(st.number_input("Folds", 2, 20, kept("tu_folds", DEFAULTS["folds"]),
                                key="tu_folds",
                                disabled=validation == "holdout"))
    pruner = pick("Trial pruning", PRUNERS, DEFAULTS["pruner"], "tu_pruner")
with right:
    space = {}
    grid = sampler == "grid"
    for path, (label, on, values, span) in PRESETS.items():  # the engine's offered ranges
        key = f"tu_{path}"
        if st.checkbox(label, kept(key, on), key=key):
            space[path] = values if grid else span
    if st.checkbox("Optimizer", kept("tu_opt", False), key="tu_opt"):
        names = OPTIMIZERS.names()
        space["train.optimizer"] = st.multiselect(
            "Optimizers", names, [n for n in kept("tu_opts", RACE) if n in names],
            key="tu_opts")
    typo = None  # a half-typed width list: shown with the other problems below
    if st.checkbox("Hidden layer widths", kept("tu_hidden", True), key="tu_hidden"):
        widths = st.text_input("Width choices (JSON)",
                               kept("tu_widths", "[[16], [64], [64, 32]]"), key="tu_widths")
        try:
            space["model.hidden"] = json_list(widths, "Width choices (JSON)",
                                              "[[16], [64, 32]]")
        except UserError as exc:
            space["model.hidden"], typo = [], exc
    objectives = st.multiselect(
        "Objectives", list(OBJECTIVES),
        [o for o in kept("tu_obj", list(DEFAULTS["objectives"])) if o in OBJECTIVES],
        key="tu_obj",
        format_func=search_plots.objective_label,
        help=f"More than one: the result is a Pareto front; the samplers "
             f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)} search for one.")
with trials_slot:
    if grid:  # the engine's default for a grid: every combination once
        size = math.prod(len(v) for v in space.values()) if space else 0
        st.caption(f"Trials: the whole grid, {size} combination(s), each tried once.")
        trials = None
    else:
        trials = int(st.number_input("Trials", 1, 500, kept("tu_trials", DEFAULTS["n_trials"]),
                                     key="tu_trials"))

tune = {"sampler": sampler, "timeout_s": timeout or None, "workers": workers,
        "validation": validation, "folds": folds, "pruner": pruner, "space": space,
        "objectives": objectives}
if trials is not None:
    tune["n_trials"] = trials
recipe = None
try:
    if typo is not None:
        raise typo
    recipe = resolve({"data": sel["data"], "model": sel["model"], "train": train_cfg,
                      "tune": tune})
except Exception as exc:
    show_error(exc)
if st.button("Search", type="primary", key="tu_run", icon=":material/search:",
             disabled=recipe is None, help="Fix the setting named above first."
             if recipe is None else None):
    try:
        remember("tu_watch", submit(recipe, name=f"search {sampler} · {recipe.title()}"))
    except Exception as exc:
        show_error(exc)

run_id = st.session_state.get("tu_watch")
if run_id:
    store = Store()
    run = store.get_run(run_id) or {}
    # the objectives the run searches for, which the widgets above may no longer show
    searched = ((run.get("recipe") or {}).get("tune") or {}).get("objectives") or objectives

    def trials_live() -> None:
        found = [e for e in store.events(run_id) if e.get("event") == "trial"]
        done = [t for t in found if t.get("state") == "COMPLETE" and t.get("values")]
        st.caption(f"{len(found)} trial(s) finished")
        if not done:
            st.caption("The optimization history and the parameters of each trial appear "
                       "once a trial completes.")
            return
        study = load_study(found[-1]["study"], store.url)
        a, b = st.columns(2)
        a.plotly_chart(search_plots.optimization_history(study, searched), key="tu_history")
        b.plotly_chart(search_plots.parallel_coordinates(study, searched), key="tu_parcoords")
        if len(searched) == 2 and searched[0] == "val_score":  # the front, as it grows
            points = [{"name": f"trial {t['number']}", "technique": "trial",
                       "chain": str(t["params"]), searched[0]: t["values"][0],
                       searched[1]: t["values"][1]} for t in done]
            st.plotly_chart(plots.pareto(points, searched[1], searched[0],
                                         title="Pareto front of the trials"),
                            key="tu_pareto")

    st.fragment(trials_live, run_every=1.0 if run.get("status") in ACTIVE else None)()
    watch([run_id], key="tu_live")
    tuning = ((store.get_run(run_id) or {}).get("result") or {}).get("tuning")
    if tuning:
        if tuning.get("best_params"):
            best = tuning.get("best_value", (tuning.get("best_values") or [None])[0])
            st.success(f"Best {search_plots.objective_label(tuning['objectives'][0])}: "
                       f"{best:.4f} with {winner(tuning)}. The run trained this winner as "
                       f"its baseline.")
        st.dataframe(ranked_trials(tuning), hide_index=True)
        if tuning.get("importances"):  # the engine found enough trials and parameters
            st.plotly_chart(search_plots.param_importances(load_study(tuning["study"], store.url),
                                                           tuning["objectives"]),
                            key="tu_importances")
        elif tuning.get("importances_note"):
            st.caption(tuning["importances_note"])
        if tuning.get("pareto"):
            st.dataframe([{"trial": t["number"], **t["params"], **dict(zip(
                tuning["objectives"], t["values"], strict=False))} for t in tuning["pareto"]],
                hide_index=True)
