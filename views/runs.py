"""Runs: every run in the store; overlay several, open one, download or delete it."""

import functools
import json
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from engine import jobs, plots, ray_backend
from engine.bundle import is_bundle, zipped
from engine.errors import UserError, sentence
from engine.metrics import score_key
from engine.recipe import short_source
from engine.settings import backend_name
from engine.store import Store
from views.common import show_error, table
from views.live import curves_of, metric_of
from views.workspace import session_owner

st.title("Runs")
store = Store()
jobs.reap(store)
try:  # where runs go, and what the cluster has free
    if backend_name() == "ray":
        free = ray_backend.resources_now()
        st.caption("Ray cluster · " + " · ".join(
            f"{k}: {v['free']:g} of {v['total']:g} free" for k, v in free.items()
            if k != "nodes") + f" · {free['nodes']['total']:g} node(s)")
except UserError as exc:
    show_error(exc)
only_mine = st.toggle("Only runs started in this workspace", key="runs_mine",
                      help="This URL's runs (?ws=...); several people may share this "
                           "instance, and every run is kept.")
runs = store.list_runs(owner=session_owner() if only_mine else None)
if not runs:
    st.info("No runs yet. Start one on the Train page; it will be listed here.")
    st.page_link("views/train.py", label="Go to Train", icon=":material/play_arrow:")
    st.stop()


def row(run: dict) -> dict:
    recipe, m = run["recipe"], run.get("metrics") or {}
    return {"name": run["name"], "status": run["status"],
            "data": short_source(recipe["data"]["source"]),
            "model": short_source(recipe["model"]["source"]),  # not a bundle's full path
            "optimizer": recipe["train"]["optimizer"],
            "test score": m.get(score_key(m) or "test_r2"),
            "parameters": m.get("params"), "size (KiB)": round(m["size_bytes"] / 1024, 1)
            if m.get("size_bytes") else None, "time (s)": round(run.get("duration_s") or 0, 1),
            "ran on": f"{run.get('backend') or 'local'} · {run.get('node') or run['host']}",
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created"]))}


# a new key after a deletion clears the selection, so the next run is never opened by itself
table_key = f"runs_table_{st.session_state.get('runs_deleted', 0)}"
picked = table(pd.DataFrame([row(r) for r in runs]),
               on_select="rerun", selection_mode="multi-row", key=table_key)
chosen = [runs[i] for i in picked.selection.rows]
if not chosen:
    st.caption("Select one run to open it, or several to overlay their curves.")
    st.stop()

histories = curves_of(store, chosen)
left, right = st.columns(2)
left.plotly_chart(plots.curves(histories, "loss"), key="runs_loss")
right.plotly_chart(plots.curves(histories, metric_of(histories)), key="runs_metric")
if len(chosen) > 1:
    st.stop()

run = chosen[0]
st.subheader(f"{run['name']} · {run['status']}")
if run.get("error"):
    st.error(sentence(run["error"]))
variants = store.variants(run["id"])
if variants:
    table(pd.DataFrame([{"variant": v["name"], **v["metrics"]} for v in variants]))
with st.expander("Recipe"):
    st.json(run["recipe"])
cols = st.columns(4)
cols[0].download_button("Recipe (JSON)", json.dumps(run["recipe"], indent=2),
                        file_name=f"recipe-{run['id']}.json", key="runs_dl_recipe")
cols[1].download_button("Result (JSON)", json.dumps(store.result(run["id"]), indent=2),
                        file_name=f"result-{run['id']}.json", key="runs_dl_result")
for i, v in enumerate(v for v in variants if v.get("model_file")):
    path = Path(v["model_file"])
    if is_bundle(path):  # the bundle and its exports, one ZIP
        cols[2 + i % 2].download_button(f"Model: {v['name']} (bundle ZIP)",
                                        functools.partial(zipped, path),
                                        file_name=f"{run['id']}-{v['name']}.zip",
                                        key=f"runs_dl_model_{i}")
    elif path.is_file():
        cols[2 + i % 2].download_button(f"Model: {v['name']}.onnx", path.read_bytes(),
                                        file_name=f"{run['id']}-{v['name']}.onnx",
                                        key=f"runs_dl_model_{i}")
if run["status"] in ("queued", "running"):
    if st.button("Cancel run", key="runs_cancel"):
        jobs.cancel(run["id"], store=store, grace_s=3.0)
        st.rerun()
elif st.session_state.get("runs_confirm") != run["id"]:
    if st.button("Delete run", key="runs_delete", help="Removes the run and its files."):
        st.session_state["runs_confirm"] = run["id"]
        st.rerun()
else:  # asked once more: a deletion cannot be undone
    st.warning(f"Delete **{run['name']}** ({run['id'][:6]}), its {len(variants)} "
               f"variant(s), history and files? This cannot be undone.")
    yes, no = st.columns([1, 6])
    if yes.button("Delete", type="primary", key="runs_delete_yes"):
        try:
            store.delete_run(run["id"])
            st.session_state["runs_deleted"] = st.session_state.get("runs_deleted", 0) + 1
            st.session_state.pop("runs_confirm", None)
            st.rerun()
        except Exception as exc:
            show_error(exc)
    if no.button("Keep it", key="runs_delete_no"):
        st.session_state.pop("runs_confirm", None)
        st.rerun()
