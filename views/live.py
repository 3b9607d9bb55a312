"""The live view of runs: progress, curves growing epoch by epoch, cancel, final figures.

A fragment that polls the store every second; the page around it never blocks, and the
runs go on in their worker processes whether or not anyone watches.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from engine import jobs, plots
from engine.comparison import FIDELITY_COLUMNS
from engine.compress.capabilities import ONNX_ONLY
from engine.metrics import score_key
from engine.progress import progress_of
from engine.store import Store
from views.common import describe, show_error, submit, table
from views.workspace import remember


def metric_of(histories: dict, task: str | None = None) -> str:
    """The score the curves show: accuracy or R², from the histories, else from the task."""
    keys = {k for h in histories.values() for k in h}
    if keys:
        return "accuracy" if "val_accuracy" in keys or "train_accuracy" in keys else "r2"
    return "r2" if task == "regression" else "accuracy"


def curves_of(store: Store, runs: list[dict]) -> dict[str, dict]:
    """Each run's training curves; a run that trained nothing (a run's model compressed)
    shows its variants' fine-tuning curves instead."""
    out = {}
    for run in runs:
        per_variant = store.histories(run["id"])
        if per_variant.get("baseline"):
            out[run["name"]] = per_variant["baseline"]
        else:
            out.update({f"{run['name']} · {v}": h for v, h in per_variant.items() if h})
    return out


@st.fragment(run_every=1.0)
def watch(run_ids: list[str], key: str) -> None:
    store = Store()
    jobs.reap(store)
    runs = [r for r in (store.get_run(i) for i in run_ids) if r is not None]
    if not runs:
        return
    active = [r for r in runs if r["status"] in ("queued", "running")]
    for run in runs:
        done, text = progress_of(run)
        progress = run.get("progress") or {}
        if run["status"] == "done" and progress.get("steps"):  # a chain: what it yielded
            text += f" · {len(store.variants(run['id']))} variant(s)"
        elif run["status"] == "done" and progress.get("epochs"):  # trained only
            text += f" · epoch {progress['epochs']} of {progress['epochs']}"
        st.progress(done, text=text)
        if run.get("error"):
            st.error(f"{run['name']}: {run['error']}")
    histories = curves_of(store, runs)
    task = (runs[0]["recipe"].get("data") or {}).get("task")
    left, right = st.columns(2)
    left.plotly_chart(plots.curves(histories, "loss"), key=f"{key}_loss")
    right.plotly_chart(plots.curves(histories, metric_of(histories, task)), key=f"{key}_metric")
    if active and st.button("Cancel", key=f"{key}_cancel", icon=":material/stop:"):
        for run in active:
            jobs.cancel(run["id"], store=store, grace_s=3.0)
    flag = f"{key}_was_active"
    if st.session_state.get(flag) and not active:  # just finished: redraw the whole page
        st.session_state[flag] = False
        st.rerun()
    st.session_state[flag] = bool(active)
    finished = [r for r in runs if r["status"] == "done"]
    if finished:
        rows = []
        for run in finished:
            for v in store.variants(run["id"]):
                m = v["metrics"]
                rows.append({"run": run["name"], "variant": v["name"],
                             "test score": m.get(score_key(m) or "test_r2"),
                             **{label: m.get(k) for k, label in FIDELITY_COLUMNS.items()
                                if m.get(k) is not None},
                             "parameters": m.get("params"), "size (KiB)":
                             round(m.get("size_bytes", 0) / 1024, 1),
                             "latency (ms, batch 1)": m.get("latency_ms"),
                             "epochs": m.get("epochs_run"), "train time (s)":
                             m.get("train_time_s")})
        table(pd.DataFrame(rows))


def onnx_only(sel: dict[str, Any]) -> None:
    """The Train page for an ONNX model: what it can do here, and the run that does it."""
    st.info(ONNX_ONLY.format(what="train"))
    if st.button("Evaluate and int8-quantize it", type="primary", key="tr_onnx_run"):
        try:
            remember("watch", [submit({"data": sel["data"], "model": sel["model"]},
                                      name=f"{describe(sel['model'])} · ONNX Runtime")])
        except Exception as exc:
            show_error(exc)
    if st.session_state.get("watch"):
        watch(st.session_state["watch"], key="tr_live")

