"""Compress: build a chain of techniques by clicking, run it, see what each step bought."""

import streamlit as st

from engine import jobs, plots
from engine.compress import COMPRESSORS, describe_step
from engine.runner import resolve
from engine.store import Store
from views import autocompress_view
from views.common import (
    describe,
    recipe_download,
    registry_choice,
    selection,
    show_error,
    submit,
    train_settings,
)
from views.live import watch
from views.workspace import kept, remember, session_owner

st.title("Compress")
store = Store()
jobs.reap(store)
sel = selection()
# a first step to edit or run: pruning with the registry's defaults
chain = st.session_state.setdefault("cmp_chain", [{"technique": "prune",
                                                   **COMPRESSORS.get("prune").defaults()}])

finished = [r for r in store.list_runs(status="done") if r["metrics"]]  # has a model
starts = ["A fresh baseline", "A finished run's model"]
start = st.radio("Start from", starts, horizontal=True, key="cmp_start",
                 index=starts.index(kept("cmp_start", starts[0])),
                 help="A fresh baseline trains the Data & Model selection with the Train "
                 "page's settings first; a run's model is compressed as it is.")
train_cfg = train_settings()
if start == "A finished run's model" and finished:
    run = st.selectbox("Run", finished, key="cmp_run",
                       format_func=lambda r: f"{r['name']} ({r['id'][:6]})")
    model_file = store.variants(run["id"])[0]["model_file"]
    base = {**run["recipe"], "model": {**run["recipe"]["model"], "source": model_file},
            "train": {**run["recipe"]["train"], "epochs": 0}, "tune": None, "diagnose": None}
    st.caption("The run's model is reloaded from its bundle, layer for layer, and compressed "
               "as it is (not retrained); distillation shrinks its architecture at the width "
               "multiplier.")
else:
    if start == "A finished run's model":
        st.info("No finished run yet; a fresh baseline is used.")
    base = {"data": sel["data"], "model": sel["model"], "train": train_cfg}
    st.caption(f"Baseline: **{describe(sel['model'])}** on **{describe(sel['data'])}**, "
               f"{train_cfg['optimizer']}, {train_cfg['epochs']} epochs.")

MODES = ["Build a chain", "Auto-compress: search within a budget"]
mode = st.radio("What to do", MODES, horizontal=True, key="ac_mode",
                index=MODES.index(kept("ac_mode", MODES[0])),
                help="Auto-compress searches chains of techniques and their settings for the "
                "smallest (or fastest) model that loses at most the accuracy you allow.")
if mode == MODES[1]:
    autocompress_view.page(base, store)
    st.stop()

left, right = st.columns([2, 3])
with left:
    st.subheader("Add a step")
    technique, params, typo = registry_choice(COMPRESSORS, "Technique", "cmp_tech",
                                              "prune", {})
    add, preset = st.columns(2)
    if add.button("Add step", key="cmp_add", icon=":material/add:", disabled=bool(typo),
                  help=typo):
        chain.append({"technique": technique, **params})
    deep = COMPRESSORS.get("deep_compression").defaults()
    if preset.button("Deep Compression preset", key="cmp_preset",
                     help=f"Prune {deep['amount']:.0%}, share {deep['bits']}-bit weights, "
                          f"Huffman-code them (Han et al.)."):
        chain[:] = [{"technique": "deep_compression"}]
with right:
    st.subheader("Chain")
    if not chain:
        st.caption("Empty: add a step on the left.")
    for i, step in enumerate(chain):
        text, remove = st.columns([5, 1])
        text.markdown(f"{i + 1}. `{describe_step(step)}`")
        if remove.button("Remove", key=f"cmp_rm_{i}"):
            chain.pop(i)
            st.rerun()
    sensitivity = st.checkbox("Per-layer sensitivity analysis (heatmap)",
                              bool(kept("cmp_sens", True)), key="cmp_sens")

recipe, problem = None, None
try:
    recipe = resolve({**base, "compress": chain, "sensitivity": {} if sensitivity else None})
except Exception as exc:  # named as the chain shows it, not by its recipe key
    labels = {f"compress[{i}].{key}": f"{key.replace('_', ' ')} of step {i + 1} "
              f"({step['technique']})" for i, step in enumerate(chain) for key in step}
    labels.update({f"compress[{i}]": f"step {i + 1} ({step['technique']})"
                   for i, step in enumerate(chain)})
    problem = show_error(exc, labels)  # Run stays on the page, disabled with this reason
go, each, download = st.columns([1, 2, 3])
if recipe is not None:
    with download:
        recipe_download(recipe.to_dict(), key="cmp_download")
try:
    if go.button("Run chain", type="primary", key="cmp_run_btn",
                 disabled=recipe is None or not chain, help=problem) and recipe is not None:
        remember("cmp_watch", [submit(
            recipe, name=f"{' -> '.join(s['technique'] for s in chain)} · {recipe.title()}")])
    if each.button("Compare the steps side by side", key="cmp_each_btn",
                   disabled=recipe is None or len(chain) < 2,
                   help=problem or "One run per step, each from its own baseline, run in "
                   "parallel (as Ray tasks when Ray is configured)."):
        remember("cmp_watch", jobs.compare(recipe, [[step] for step in chain],
                                           owner=session_owner()))
except Exception as exc:
    show_error(exc)

run_ids = st.session_state.get("cmp_watch") or []
if run_ids:
    st.subheader("Progress")
    watch(run_ids, key="cmp_live")
    for run in filter(None, map(store.get_run, run_ids)):
        if run["status"] != "done":
            continue
        sens = (run.get("result") or {}).get("sensitivity")
        if sens:
            st.plotly_chart(plots.sensitivity_heatmap(sens), key=f"cmp_heatmap_{run['id']}")
        for v in store.variants(run["id"]):
            for note in v["metrics"].get("notes", []):
                st.caption(f"{v['name']}: {note}")
    st.page_link("views/compare.py", label="Compare all variants", icon=":material/scatter_plot:")
