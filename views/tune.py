"""Tune: a search space built by clicking, a sampler, a budget; trials fill in live."""

import math
from typing import Any

import streamlit as st

from engine import search_plots
from engine.runner import resolve
from engine.tune import (
    DEFAULTS,
    MULTI_OBJECTIVE_SAMPLERS,
    OBJECTIVES,
    PRUNERS,
    SAMPLER_LABELS,
    SAMPLERS,
    VALIDATIONS,
)
from views import search_view
from views.common import (
    describe,
    selection,
    show_error,
    submit,
    train_settings,
)
from views.workspace import kept, remember, save_workspace


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
    space, typo = search_view.space_inputs(grid := sampler == "grid")
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
    search_view.show(run_id, objectives)
