"""The Compress page's Auto-compress mode: a budget and an objective by clicking, the
search's trials drawn as they finish, then the recommendation, its recipe and Deploy."""

import json
from typing import Any

import streamlit as st

from engine import search_plots
from engine.autocompress import (
    DEFAULT_TECHNIQUES,
    DEFAULTS,
    OBJECTIVE_LABELS,
    OBJECTIVES,
    TECHNIQUE_LABELS,
    TECHNIQUES,
)
from engine.runner import resolve
from engine.store import ACTIVE, Store
from views.common import show_error, submit, table
from views.live import watch
from views.workspace import kept, remember


def settings() -> dict[str, Any]:
    """The `autocompress` section the widgets describe (the engine's defaults first)."""
    objective = st.radio("Objective", OBJECTIVES, horizontal=True, key="ac_objective",
                         index=OBJECTIVES.index(kept("ac_objective", DEFAULTS["objective"])),
                         format_func=OBJECTIVE_LABELS.get)
    a, b, c = st.columns(3)
    points = a.number_input("Most points of accuracy lost", 0.0, 50.0, step=0.5,
                            value=float(kept("ac_points",
                                             DEFAULTS["budget"]["max_drop"] * 100)),
                            key="ac_points", help="On the validation rows, against the "
                            "baseline: 1 point is 0.01 of accuracy (or of agreement).")
    budget: dict[str, float] = {"max_drop": points / 100}
    if b.checkbox("Also a size limit", kept("ac_size_on", False), key="ac_size_on"):
        budget["max_size_bytes"] = 1024 * b.number_input(
            "Most KiB", 0.1, 1e7, value=float(kept("ac_size", 100.0)), key="ac_size")
    if c.checkbox("Also a latency limit", kept("ac_lat_on", False), key="ac_lat_on"):
        budget["max_latency_ms"] = c.number_input(
            "Most ms at batch 1", 0.001, 1e5, value=float(kept("ac_lat", 1.0)),
            format="%.3f", key="ac_lat")
    default = list(DEFAULT_TECHNIQUES[objective])
    techniques = st.multiselect("Techniques the search may chain", TECHNIQUES,
                                [t for t in kept(f"ac_tech_{objective}", default)
                                 if t in TECHNIQUES], key=f"ac_tech_{objective}",
                                format_func=TECHNIQUE_LABELS.get,
                                help="Stages run in this order: distillation, structured "
                                "pruning, magnitude pruning, low rank, then sharing or "
                                "quantization.")
    d, e = st.columns(2)
    trials = d.number_input("Trials", 1, 500, int(kept("ac_trials", DEFAULTS["trials"])),
                            key="ac_trials")
    epochs = e.number_input("Most fine-tuning epochs per stage", 0, 200,
                            int(kept("ac_epochs", DEFAULTS["max_epochs"])), key="ac_epochs")
    return {"budget": budget, "objective": objective, "techniques": techniques,
            "trials": int(trials), "max_epochs": int(epochs)}


def trials_live(store: Store, run_id: str, objective: str, max_drop: float | None) -> None:
    """Every finished trial on the plane of points lost against cost, redrawn as they come."""
    found = [e for e in store.events(run_id) if e.get("event") == "candidate"]
    total = found[-1]["trials"] if found else None
    st.caption(f"{len(found)} of {total} trials finished" if found else
               "The trials appear here as they finish (the baseline trains first).")
    if found:
        st.plotly_chart(search_plots.search_front(found, objective, max_drop=max_drop),
                        key="ac_front_live")


def card(store: Store, run: dict[str, Any]) -> None:
    """The recommendation: what it did in words and per layer, its figures against the
    baseline (the harness's, as on every page), its recipe, and Deploy."""
    section = (run.get("result") or {}).get("autocompress")
    if not section:
        return
    st.plotly_chart(search_plots.search_front(section["trials"], section["objective"],
                                       max_drop=section["budget"].get("max_drop"),
                                       chosen=section.get("chosen_trial")),
                    key=f"ac_front_{run['id']}")
    for failure in section.get("failed", [])[:3]:
        st.caption(f"Trial {failure['number']} could not run: {failure['error']}")
    if not section.get("recommended"):
        st.warning(section["message"])
        return
    variants = {v["name"]: v for v in store.variants(run["id"])}
    found, base = variants[section["recommended"]], variants["baseline"]
    st.subheader("Recommended")
    st.success(" ".join(section["explanation"]["words"]))
    m, b = found["metrics"], base["metrics"]
    key = next(k for k in ("test_agreement", "test_accuracy", "test_r2") if k in m)
    one, two, three = st.columns(3)
    one.metric(key.replace("_", " "), f"{m[key]:.4f}", f"{(m[key] - b[key]) * 100:+.1f} points")
    two.metric("shipped file", f"{m['size_bytes'] / 1024:,.1f} KiB",
               f"{b['size_bytes'] / m['size_bytes']:.1f}x smaller", delta_color="off")
    three.metric("latency, batch 1", f"{m['latency_ms']:.4f} ms",
                 f"{m.get('speedup', 1):.2f}x the baseline's speed", delta_color="off")
    table([{"layer": row["layer"], "shape (out x in)": "x".join(map(str, row["shape"])),
            "now": "x".join(map(str, row["now"])) if isinstance(row["now"], list)
            else row["now"],
            "weights kept": f"{row['kept']:.1%}" if "kept" in row else None,
            "bits per weight": row.get("bits"), "rank": row.get("rank")}
           for row in section["explanation"]["layers"]])
    left, right = st.columns(2)
    left.download_button("Download the recipe that replays it", json.dumps(
        section["recipe"], indent=2), file_name="autocompress-recipe.json",
        mime="application/json", key=f"ac_{run['id']}_recipe_btn", icon=":material/download:")
    if right.button("Deploy this model", key=f"ac_{run['id']}_deploy_btn", type="primary",
                    icon=":material/rocket_launch:"):
        st.session_state["dep_pick"] = run["id"]
        st.switch_page("views/deploy.py")


def page(base: dict[str, Any], store: Store) -> None:
    """The mode's whole body, below the page's choice of baseline."""
    section = settings()
    recipe, problem = None, None
    try:
        recipe = resolve({**base, "autocompress": section})
    except Exception as exc:
        problem = show_error(exc)  # Run stays on the page, disabled with this reason
    if not section["techniques"]:
        problem = "Pick at least one technique for the search to chain."
        st.info(problem)
    try:
        if st.button("Search", type="primary", key="ac_run_btn", disabled=bool(problem),
                     help=problem) and recipe is not None:
            remember("ac_watch", [submit(recipe, name=f"auto-compress "
                                         f"{section['objective']} · {recipe.title()}")])
    except Exception as exc:
        show_error(exc)
    run_ids = st.session_state.get("ac_watch") or []
    run = store.get_run(run_ids[0]) if run_ids else None
    if run is None:
        return
    st.subheader("Search")
    searched = (run.get("recipe") or {}).get("autocompress") or section
    if run["status"] in ACTIVE:
        st.fragment(lambda: trials_live(store, run["id"], searched["objective"],
                                        searched["budget"].get("max_drop")),
                    run_every=1.0)()
    watch([run["id"]], key="ac_live")
    if run["status"] == "done":
        card(store, store.get_run(run["id"]) or run)
