"""Compare: accuracy against size and latency for every variant, the Pareto front drawn.

Runs still going are drawn too: the plots poll the store and fill in as variants finish
(the showcase lands here). **Download report** writes the chosen runs as one HTML file.
"""

import pandas as pd
import streamlit as st

from engine import comparison, jobs, plots, report
from engine.comparison import SOURCES
from engine.store import ACTIVE, Store
from views.common import table

st.title("Compare")
store = Store()
jobs.reap(store)
runs = {r["id"]: r for r in store.list_runs() if r["status"] == "done" or r["status"] in ACTIVE}
if not runs:
    st.info("No finished runs yet. Train a model or run a compression chain first, or press "
            "Showcase on the Home page.")
    st.page_link("views/compress.py", label="Go to Compress", icon=":material/compress:")
    st.stop()

landed = st.session_state.pop("showcase_runs", None)  # from the Home page's Showcase
if landed:
    st.session_state["cmp_runs"] = [i for i in landed if i in runs]
if "cmp_runs" not in st.session_state:
    st.session_state["cmp_runs"] = comparison.default_selection(list(runs.values()), store)
st.session_state["cmp_runs"] = [i for i in st.session_state["cmp_runs"] if i in runs]
picked = st.multiselect("Runs", list(runs), key="cmp_runs",
                        format_func=lambda i: f"{comparison.run_label(runs[i])} ({i[:6]}) · "
                                              f"{runs[i]['status']}")
one_baseline = st.toggle("One baseline per training recipe", True, key="cmp_one_base",
                         help="Runs that compress the same seeded model each train it again; "
                              "show that baseline once.")


@st.cache_data(show_spinner=False)
def descriptions() -> dict[str, str]:
    return comparison.technique_descriptions()


def draw(run_ids: list[str]) -> None:
    fresh = Store()
    jobs.reap(fresh)
    states = [fresh.get_run(i)["status"] for i in run_ids]
    active = sum(s in ACTIVE for s in states)
    if active:
        st.progress(1 - active / len(states), text=f"{len(states) - active} of {len(states)} "
                    f"runs finished; the plots fill in as variants are measured")
    groups = comparison.data_groups(fresh, run_ids)
    if len(groups) > 1:
        st.info(f"These runs were scored on {len(groups)} different datasets, so each has its "
                f"own front: a score on one dataset says nothing about another.")
    for i, (label, ids) in enumerate(groups.items()):
        if len(groups) > 1:
            st.subheader(f"Data: {label}")
        draw_group(fresh, ids, f"{i}")
    if st.session_state.get("cmp_was_active") and not active:
        st.session_state["cmp_was_active"] = False
        st.rerun()  # everything finished: redraw the page once, without polling
    st.session_state["cmp_was_active"] = bool(active)


def draw_group(fresh: Store, run_ids: list[str], suffix: str) -> None:
    """The fronts, the table and the training curves of runs scored on one dataset."""
    points = comparison.variant_points(fresh, run_ids, one_baseline=one_baseline)
    if not points:
        st.caption("No variant measured yet.")
    else:
        metric = comparison.score_metric(points)
        left, right = st.columns(2)
        left.plotly_chart(plots.pareto(points, "size_bytes", metric,
                                       descriptions=descriptions()), key=f"cmp_size{suffix}")
        right.plotly_chart(plots.pareto(points, "latency_ms", metric,
                                        descriptions=descriptions()),
                           key=f"cmp_latency{suffix}")
        st.caption(SOURCES + " Hover a point for what its technique does.")
        table(pd.DataFrame(comparison.table_records(points)),
              column_config={  # the variant stays in view while the wide table scrolls
                  "variant": st.column_config.TextColumn(pinned=True),
                  "chain": st.column_config.TextColumn(
                      width="large",
                      help="the compression steps that made this variant [its runtime]")})
    histories = comparison.training_histories(fresh, run_ids)
    if len(histories) > 1:  # an optimizer race, or runs trained differently
        st.plotly_chart(plots.curves(histories, "loss", title="training: loss per epoch"),
                        key=f"cmp_curves{suffix}")


if picked:
    live = any(runs[i]["status"] in ACTIVE for i in picked)
    st.fragment(draw, run_every=2.0 if live else None)(picked)
    st.download_button("Download report (HTML)", lambda: report.build(store, picked),
                       file_name="workbench_report.html", mime="text/html", key="cmp_report",
                       on_click="ignore", icon=":material/download:",
                       help="One HTML file with these runs' table, Pareto plots, curves, "
                            "diagnostics, recipes and machine; it opens offline, and each "
                            "plot's camera button saves a PNG.")
