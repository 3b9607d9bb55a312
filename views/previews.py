"""What the Data & Model page shows: cached previews from the engine, placed as figures."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from engine import plots
from engine.data import describe_encoding
from engine.runner import resolve
from views.common import table


@st.cache_data(max_entries=16, show_spinner="Loading the data...")
def data_preview(data_json: str, seed: int, model_source: str | None = None) -> dict[str, Any]:
    """The engine's data preview, cached by the data section's JSON (and the model, whose
    tokenizer turns text into token ids)."""
    from engine.data import preview

    return preview(resolve({"data": json.loads(data_json)}).data, seed=seed,
                   model_source=model_source)


@st.cache_data(max_entries=16, show_spinner="Building the model...")
def model_preview(model_json: str, data_json: str) -> dict[str, Any]:
    """Complexity figures and layers of the model as it would be built for this data."""
    from engine.compress.capabilities import model_capabilities
    from engine.models import describe, own_outputs

    summary = data_preview(data_json, 0, json.loads(model_json).get("source"))
    n_out = len(summary.get("classes") or {}) or 1
    cfg = resolve({"model": json.loads(model_json)}).model
    shape = tuple(summary["input_shape"])
    if json.loads(data_json).get("labels") == "teacher":  # the model's own classes
        n_out, _ = own_outputs(cfg, shape)
    return {**describe(cfg, shape, n_out),
            "capabilities": model_capabilities(cfg, shape, n_out)}


def show_data(summary: dict[str, Any]) -> None:
    """Rows per split, input shape, sample images or rows, class balance."""
    cols = st.columns(4)
    for col, part in zip(cols, ("train", "val", "test"), strict=False):
        col.metric(f"{part} rows", summary["rows"][part])
    cols[3].metric("input shape", "x".join(map(str, summary["input_shape"])))
    st.caption(f"Task: {summary['task']}")
    encoded = describe_encoding(summary.get("encoding"))
    if encoded:
        st.caption(encoded)
    text = summary.get("text")
    if text:
        st.caption(f"Text tokenized by the tokenizer of {text['tokenizer'].rsplit('/', 1)[-1]}"
                   f": {text['tokens']} tokens per row (padded to the longest, at most "
                   f"{text['max_length']}). " + text.get("note", "No text was truncated."))
    if summary.get("images"):
        st.plotly_chart(plots.image_grid(summary["images"], summary["image_labels"]),
                        key="dm_images")
    elif summary.get("head"):
        st.dataframe(pd.DataFrame(summary["head"]), height=220)
    if summary.get("lengths"):
        st.plotly_chart(plots.token_lengths(summary["lengths"], text["max_length"]),
                        key="dm_lengths")
    if summary.get("classes"):
        st.plotly_chart(plots.class_balance(summary["classes"]), key="dm_balance")


def show_model(info: dict[str, Any]) -> None:
    """Complexity figures and the layer table (operators for an ONNX file)."""
    cols = st.columns(4)
    cols[0].metric("parameters", f"{info['params']:,}")
    cols[1].metric("trainable", f"{info.get('trainable_params', info['params']):,}")
    cols[2].metric("FLOPs / sample", f"{info['flops']:,}" if "flops" in info else "n/a")
    cols[3].metric("size", f"{info['size_bytes'] / 1024:.1f} KiB",
                   help="The weights as torch.save writes them; a run reports its compressed "
                        "encoding (model.wbz), the size Compare and Deploy show.")
    if info.get("layers"):
        table(pd.DataFrame(info["layers"]), height=260)
    if info.get("operators"):
        st.caption("ONNX operators: " + ", ".join(f"{k} x{v}" for k, v in
                                                 info["operators"].items()))
    if info.get("capabilities"):
        st.subheader("What works on this model")
        rows = [{"technique": r["technique"] + (f" {r['method']}" if r["method"] else ""),
                 "status": r["status"], "why not, or the catch": r["why"]}
                for r in info["capabilities"]]
        table(pd.DataFrame(rows), key="dm_capabilities")
