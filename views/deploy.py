"""Deploy: each variant as an ONNX file that takes raw inputs, as ONNX Runtime runs it."""

import pandas as pd
import streamlit as st

from engine import deploy, jobs
from engine.measure import onnx_not_smaller
from engine.store import Store, run_dir
from views.common import show_error, table

st.title("Deploy")
store = Store()
jobs.reap(store)
runs = store.list_runs(status="done")
if not runs:
    st.info("No finished runs yet. Train or compress a model first.")
    st.stop()
picked = st.session_state.pop("dep_pick", None)  # "Deploy this model" on another page
if picked is not None:
    st.session_state.pop("dep_run", None)
run = st.selectbox("Run", runs, key="dep_run", format_func=lambda r: f"{r['name']} "
                   f"({r['id'][:6]})", index=next((i for i, r in enumerate(runs)
                                                   if r["id"] == picked), 0))
folder = run_dir(run["id"])
exported = st.session_state.setdefault("dep_exported", {})
variants = store.variants(run["id"])

for v in variants:  # exports made with the run (recipe export.onnx) or on this page
    key = (run["id"], v["name"])
    if key not in exported and "deploy" in v["metrics"]:
        exported[key] = v["metrics"]["deploy"]
missing = [v for v in variants if (run["id"], v["name"]) not in exported and v["model_file"]]
if missing and st.button(f"Export {len(missing)} variant(s) to ONNX", type="primary",
                         key="dep_export"):
    failed = False
    for v in missing:
        with st.spinner(f"Exporting and timing {v['name']}..."):
            try:
                file, info = deploy.export_stored(run["recipe"], v["model_file"],
                                                  name=v["name"])
                (folder / v["name"]).mkdir(parents=True, exist_ok=True)
                (folder / v["name"] / "model.onnx").write_bytes(file)
                exported[(run["id"], v["name"])] = {**info, "file": f"{v['name']}/model.onnx"}
            except Exception as exc:
                show_error(exc)
                failed = True  # its message stays on the page
    if not failed:
        st.rerun()  # the button counted the variants still to export: none now

rows = []
for v in variants:
    info = exported.get((run["id"], v["name"]))
    if info is None:
        continue
    metric = next(iter(info["onnx"]))
    cpu, eager = info["latency"]["onnxruntime_cpu"], info["latency"].get("torch_eager", {})
    m = v["metrics"]
    rows.append({"variant": v["name"], f"ONNX {metric}": info["onnx"][metric],
                 f"PyTorch {metric}": (info.get("torch") or {}).get(metric),
                 "matches PyTorch": info.get("parity_ok"), "max |diff|": info.get("max_abs_diff"),
                 "ONNX KiB": round(info["bytes"] / 1024, 1),
                 "encoded KiB": round(m["size_bytes"] / 1024, 1)
                 if m.get("size_bytes") else None,
                 # the one latency of the variant, as on Compare and in result.json
                 "latency ms": m.get("latency_ms"), "runs in": m.get("runtime"),
                 "speedup": m.get("speedup"),
                 "ONNX file p50 / p95 ms": f"{cpu['median_ms']:.4f} / {cpu['p95_ms']:.4f}",
                 "ONNX file rows/s": round(cpu["throughput_per_s"]),
                 "PyTorch rows/s": round(eager["throughput_per_s"]) if eager else None})
if not rows:
    st.caption("Export the variants to compare them under ONNX Runtime.")
    st.stop()
table(pd.DataFrame(rows))
st.caption("ONNX KiB is the file ONNX Runtime runs; encoded KiB is the variant's compressed "
           "encoding (model.wbz, the size Compare shows).")
base = exported.get((run["id"], variants[0]["name"]))
for v in variants[1:] if base else []:  # a compression ONNX does not carry is said
    info = exported.get((run["id"], v["name"]))
    if info is not None and info["bytes"] >= 0.95 * base["bytes"]:
        st.caption(onnx_not_smaller(v["name"], info["bytes"], base["bytes"]))
info0 = exported[(run["id"], rows[0]["variant"])]
reference = next((v["metrics"]["speedup_reference"] for v in variants
                  if v["metrics"].get("speedup_reference")), "the baseline")
st.caption(f"latency ms is each variant's one measurement at batch 1, in the runtime it runs "
           f"in (the figure Compare and result.json show); speedup is against {reference}. "
           f"The ONNX file columns time the exported file itself in ONNX Runtime (batch 1, "
           f"and rows/s at batch {info0['latency']['onnxruntime_cpu']['batch']}), "
           f"{info0['threads']} thread(s), on {info0['machine']['processor']}. A variant whose "
           f"outputs differ from PyTorch's beyond the tolerance is marked, not hidden.")

name = st.selectbox("Download", [r["variant"] for r in rows], key="dep_pick")
info = exported[(run["id"], name)]
path = folder / info["file"]
classes = ((store.get_run(run["id"])["result"] or {}).get("data") or {}).get("classes")
shipped = f"{name}.onnx"  # every variant's file is <variant>/model.onnx in the run folder
snippet = deploy.predict_snippet(shipped, info, list(classes) if classes else None)
left, right = st.columns(2)
if path.is_file():
    left.download_button(shipped, path.read_bytes(), file_name=shipped,
                         key="dep_dl_onnx", icon=":material/download:")
right.download_button("predict.py", snippet, file_name="predict.py", key="dep_dl_snippet")
st.code(snippet, language="python")
