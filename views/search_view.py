"""The Tune page's view of a search: trials as they finish, then the ranked result."""

from typing import Any

import streamlit as st

from engine import search_plots
from engine.errors import UserError
from engine.optimizers import OPTIMIZERS
from engine.schema import json_list
from engine.showcase import RACE
from engine.store import ACTIVE, Store
from engine.tune import PRESETS, load_study, ranked_trials, winner
from views.common import table
from views.live import watch
from views.workspace import kept


def space_inputs(grid: bool) -> tuple[dict[str, Any], UserError | None]:
    """The search space by clicking: the engine's offered ranges (a grid's values), the
    optimizers, the width lists; with a half-typed width list, the sentence saying so."""
    space: dict[str, Any] = {}
    for path, (label, on, values, span) in PRESETS.items():
        key = f"tu_{path}"
        if st.checkbox(label, kept(key, on), key=key):
            space[path] = values if grid else span
    if st.checkbox("Optimizer", kept("tu_opt", False), key="tu_opt"):
        names = OPTIMIZERS.names()
        space["train.optimizer"] = st.multiselect(
            "Optimizers", names, [n for n in kept("tu_opts", RACE) if n in names],
            key="tu_opts")
    typo = None  # shown with the page's other problems, never as a traceback
    if st.checkbox("Hidden layer widths", kept("tu_hidden", True), key="tu_hidden"):
        widths = st.text_input("Width choices (JSON)",
                               kept("tu_widths", "[[16], [64], [64, 32]]"), key="tu_widths")
        try:
            space["model.hidden"] = json_list(widths, "Width choices (JSON)",
                                              "[[16], [64, 32]]")
        except UserError as exc:
            space["model.hidden"], typo = [], exc
    return space, typo


def trials_live(store: Store, run_id: str, searched: list[str]) -> None:
    """The optimization history, the parameters of each trial and (for a score against a
    cost) the front, redrawn as trials finish."""
    found = [e for e in store.events(run_id) if e.get("event") == "trial"]
    done = [t for t in found if t.get("state") == "COMPLETE" and t.get("values")]
    st.caption(f"{len(found)} trial(s) finished")
    if not done:
        st.caption("The optimization history and the parameters of each trial appear once a "
                   "trial completes.")
        return
    study = load_study(found[-1]["study"], store.url)
    a, b = st.columns(2)
    a.plotly_chart(search_plots.optimization_history(study, searched), key="tu_history")
    b.plotly_chart(search_plots.parallel_coordinates(study, searched), key="tu_parcoords")
    front = search_plots.trial_front(done, searched)
    if front is not None:
        st.plotly_chart(front, key="tu_pareto")


def result(store: Store, tuning: dict[str, Any]) -> None:
    """The winner in words, every trial ranked, importances and the Pareto set."""
    if tuning.get("best_params"):
        best = tuning.get("best_value", (tuning.get("best_values") or [None])[0])
        st.success(f"Best {search_plots.objective_label(tuning['objectives'][0])}: "
                   f"{best:.4f} with {winner(tuning)}. The run trained this winner as its "
                   f"baseline.")
    table(ranked_trials(tuning))
    if tuning.get("importances"):  # the engine found enough trials and parameters
        st.plotly_chart(search_plots.param_importances(load_study(tuning["study"], store.url),
                                                       tuning["objectives"]),
                        key="tu_importances")
    elif tuning.get("importances_note"):
        st.caption(tuning["importances_note"])
    if tuning.get("pareto"):
        table([{"trial": t["number"], **t["params"], **dict(zip(
            tuning["objectives"], t["values"], strict=False))} for t in tuning["pareto"]])


def show(run_id: str, objectives: list[str]) -> None:
    """A search run: its trials live while it runs, its progress, then its result."""
    store = Store()
    run = store.get_run(run_id) or {}
    # the objectives the run searches for, which the page's widgets may no longer show
    searched = ((run.get("recipe") or {}).get("tune") or {}).get("objectives") or objectives
    st.fragment(lambda: trials_live(store, run_id, searched),
                run_every=1.0 if run.get("status") in ACTIVE else None)()
    watch([run_id], key="tu_live")
    tuning = ((store.get_run(run_id) or {}).get("result") or {}).get("tuning")
    if tuning:
        result(store, tuning)
