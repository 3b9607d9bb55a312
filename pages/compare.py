"""Compare: accuracy against size and latency for every variant, the Pareto front drawn."""

import pandas as pd
import streamlit as st

from engine import jobs, plots
from engine.store import Store

st.title("Compare")
store = Store()
jobs.reap(store)
runs = store.list_runs(status="done")
if not runs:
    st.info("No finished runs yet. Train a model or run a compression chain first.")
    st.page_link("pages/compress.py", label="Go to Compress", icon=":material/compress:")
    st.stop()

with_chains = [r for r in runs if len(store.variants(r["id"])) > 1]
picked = st.multiselect("Runs", runs, default=with_chains[:3] or runs[:3], key="cmp_runs",
                        format_func=lambda r: f"{r['name']} ({r['id'][:6]})")
points = []
for run in picked:
    for v in store.variants(run["id"]):
        m = v["metrics"]
        points.append({"run": run["name"], "name": v["name"], "technique": v["technique"],
                       "chain": f"{m.get('chain', '')} [{m.get('runtime', 'torch')}]",
                       **{k: m.get(k) for k in ("size_bytes", "latency_ms", "test_accuracy",
                                                "test_r2", "size_ratio", "speedup",
                                                "smaller_not_faster", "nonzero_params")}})
if not points:
    st.stop()
metric = "test_accuracy" if any(p["test_accuracy"] is not None for p in points) else "test_r2"
left, right = st.columns(2)
left.plotly_chart(plots.pareto(points, "size_bytes", metric), key="cmp_size")
right.plotly_chart(plots.pareto(points, "latency_ms", metric), key="cmp_latency")
st.caption("Sizes are the files that ship (.wbz weights, or .onnx for ONNX Runtime variants); "
           "ratios and speedups are against the baseline measured the same way. Latency is "
           "measured in the runtime shown in brackets.")
table = pd.DataFrame([{
    "run": p["run"], "variant": p["name"], "chain": p["chain"], metric: p[metric],
    "size (KiB)": round(p["size_bytes"] / 1024, 2) if p["size_bytes"] else None,
    "smaller by": p["size_ratio"], "latency (ms)": p["latency_ms"], "speedup": p["speedup"],
    "smaller but not faster": bool(p["smaller_not_faster"]),
    "Pareto-optimal (size)": r["pareto"]}
    for p, r in zip(points, plots.pareto_records(points, "size_bytes", metric), strict=False)])
st.dataframe(table, hide_index=True)
