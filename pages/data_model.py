"""Data & Model: choose what to train on and what to train, and see both before running."""

import json
from typing import Any

import streamlit as st

from engine.data import DATASETS, default_target, read_table
from engine.errors import UserError
from engine.models import MODELS
from engine.recipe import ACTIVATIONS, MISSING, SCALINGS, TASKS
from engine.runner import resolve
from engine.settings import artifacts_root
from pages.common import (
    UPLOAD_LIMIT_MB,
    default_sections,
    int_list,
    param_input,
    save_upload,
    selection,
    show_error,
)
from pages.previews import data_preview, model_preview, show_data, show_model


def builtin_choice(label: str, source: str, registry: Any, keys: tuple[str, str], choice: str,
                   fallback: str, help: str | None = None) -> tuple[Any, bool] | None:
    """"Built-in" or "Upload" for a source, and on "Built-in" the registry entry picked
    (with its description) and whether it is the one `source` already names; None on
    "Upload". `fallback` is the recipe's default source, offered after an upload."""
    builtin = source.startswith("builtin:")
    if st.radio(label, ["Built-in", "Upload"], index=0 if builtin else 1, horizontal=True,
                key=keys[0]) == "Upload":
        return None
    names = registry.names()
    current = (source if builtin else fallback).removeprefix("builtin:")
    name = st.selectbox(choice, names, index=names.index(current), key=keys[1], help=help)
    entry = registry.get(name)
    st.caption(entry.description)
    return entry, builtin and name == current


st.title("Data & Model")
sel = selection()
data, model = dict(sel["data"]), dict(sel["model"])
uploads = artifacts_root().parent / "uploads"

st.header("Data")
left, right = st.columns([2, 3])
with left:
    picked = builtin_choice("Dataset", data["source"], DATASETS, ("dm_data_kind", "dm_dataset"),
                            "Built-in dataset", default_sections()["data"]["source"],
                            "Shipped with the packages; no download.")
    if picked is not None:
        entry, same = picked
        name = entry.name
        params = data["params"] if same else {}
        if entry.params:
            with st.expander("Dataset settings"):
                params = {p.name: param_input(p, f"dm_ds_{name}_{p.name}", params.get(p.name))
                          for p in entry.params}
        data.update(source=f"builtin:{name}", params=params, target=None)
    else:
        upload = st.file_uploader(
            f"CSV, Parquet, NPZ (arrays X and y) or ZIP of class/image folders, up to "
            f"{UPLOAD_LIMIT_MB} MB", type=["csv", "parquet", "npz", "zip"], key="dm_data_file")
        if upload is not None:
            try:
                data.update(source=str(save_upload(upload, uploads)), params={})
            except UserError as exc:  # refused before it was written: the old choice stays
                show_error(exc)
        if data["source"].startswith("builtin:"):
            st.info("Upload a file to use it; the built-in dataset stays selected until then.")
        elif data["source"].lower().endswith((".csv", ".parquet")):
            try:
                columns = list(read_table(data["source"]).columns)
                target = data["target"] if data["target"] in columns else \
                    default_target(columns)
                data["target"] = st.selectbox("Target column", columns,
                                              index=columns.index(target), key="dm_target")
            except Exception as exc:
                show_error(exc)
            data["missing"] = st.selectbox("Missing values", MISSING,
                                           index=MISSING.index(data["missing"]),
                                           key="dm_missing")
    with st.expander("Task, split and scaling"):
        data["task"] = st.selectbox("Task", TASKS, index=TASKS.index(data["task"]),
                                    key="dm_task")
        data["val_fraction"] = st.slider("Validation fraction", 0.0, 0.5,
                                         float(data["val_fraction"]), 0.05, key="dm_val")
        data["test_fraction"] = st.slider("Test fraction", 0.0, 0.5,
                                          float(data["test_fraction"]), 0.05, key="dm_test")
        scaling = "standard" if data["standardize"] is True else data["standardize"]
        data["standardize"] = st.selectbox(
            "Scaling (fitted on the training part)", SCALINGS, index=SCALINGS.index(scaling),
            format_func=lambda s: {False: "none"}.get(s, s), key="dm_scaling")

st.header("Model")
mleft, mright = st.columns([2, 3])
with mleft:
    picked = builtin_choice("Model", model["source"], MODELS, ("dm_model_kind", "dm_arch"),
                            "Architecture", default_sections()["model"]["source"])
    if picked is not None:
        entry, _ = picked
        uses = entry.extra["uses"]
        model["source"] = f"builtin:{entry.name}"
        try:
            if "channels" in uses:
                model["channels"] = int_list(st.text_input(
                    "Convolution filters per block", ", ".join(map(str, model["channels"])),
                    key="dm_channels"), "Convolution filters")
                model["kernel_size"] = int(st.number_input(
                    "Kernel size", 1, 15, int(model["kernel_size"]), key="dm_kernel"))
            if "hidden" in uses:
                model["hidden"] = int_list(st.text_input(
                    "Hidden layer widths", ", ".join(map(str, model["hidden"])),
                    key="dm_hidden"), "Hidden layer widths")
            if "activation" in uses:
                model["activation"] = st.selectbox(
                    "Activation", ACTIVATIONS, index=ACTIVATIONS.index(model["activation"]),
                    key="dm_activation")
        except Exception as exc:
            show_error(exc)
    else:
        upload = st.file_uploader(
            f".pt2 (torch.export), .pt state_dict or TorchScript, or .onnx, up to "
            f"{UPLOAD_LIMIT_MB} MB; files are never unpickled",
            type=["pt2", "pt", "pth", "onnx"], key="dm_model_file")
        if upload is not None:
            try:
                model["source"] = str(save_upload(upload, uploads))
            except UserError as exc:
                show_error(exc)
        archs = [None, *MODELS.names()]
        model["architecture"] = st.selectbox(
            "Architecture of a state_dict", archs, index=archs.index(model["architecture"]),
            format_func=lambda a: a or "(not a state_dict)", key="dm_state_arch")

try:
    checked = resolve({"data": data, "model": model})
    sel["data"], sel["model"] = data, model  # only settings the engine accepts are kept
    with right:
        show_data(data_preview(json.dumps(checked.to_dict()["data"]), 0))
    with mright:
        show_model(model_preview(json.dumps(checked.to_dict()["model"]),
                                 json.dumps(checked.to_dict()["data"])))
    st.page_link("pages/train.py", label="Train this model", icon=":material/play_arrow:")
except Exception as exc:
    show_error(exc)
