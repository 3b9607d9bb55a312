"""Data & Model: choose what to train on and what to train, and see both before running."""

import json

import streamlit as st

from engine.data import DATASETS, default_target, read_table
from engine.errors import UserError
from engine.models import MODELS
from engine.recipe import MISSING, SCALINGS, TASKS
from engine.runner import resolve
from engine.settings import artifacts_root
from engine.uploads import unpack_model_folder
from views.common import (
    UPLOAD_LIMIT_MB,
    default_sections,
    describe,
    param_input,
    save_upload,
    selection,
    show_error,
)
from views.pickers import architecture_inputs, builtin_choice, label_inputs, real_architecture
from views.previews import data_preview, model_preview, show_data, show_model

# recipe keys as the boxes on this page that set them, for the messages
LABELS = {"data.missing": "Missing values", "data.target": "Target column", "data.task": "Task",
          "data.val_fraction": "Validation fraction", "data.test_fraction": "Test fraction",
          "data.standardize": "Scaling", "data.params": "Dataset settings",
          "data.feature_selection": "feature selection", "model.hidden": "Hidden layer widths",
          "model.channels": "Convolution filters per block", "model.kernel_size": "Kernel size",
          "model.activation": "Activation", "model.architecture": "Architecture of a state_dict",
          "model.dropout": "Dropout", "data.labels": "Labels",
          "data.label_space": "Integer labels", "data.text": "Text column",
          "data.max_length": "Tokens per text", "data.tokenizer": "Tokenizer"}


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
        data.update(source=f"builtin:{name}", params=params, target=None, text=None)
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
            except UserError:
                columns = []  # unreadable: the check below says why, once
            if columns:
                texts = [None, *columns]
                data["text"] = st.selectbox(
                    "Text column", texts, index=texts.index(data.get("text"))
                    if data.get("text") in texts else 0, key="dm_text",
                    format_func=lambda c: c or "(none: a table of features)",
                    help="For a Hugging Face text model: each row's text is tokenized by "
                         "the model's tokenizer.")
                labels = [c for c in columns if c != data["text"]] or columns
                target = data["target"] if data["target"] in labels else \
                    default_target(labels)
                data["target"] = st.selectbox("Target column", labels,
                                              index=labels.index(target), key="dm_target")
            data["missing"] = st.selectbox("Missing values", MISSING,
                                           index=MISSING.index(data["missing"]),
                                           key="dm_missing")
    with st.expander("Task, split and scaling"):
        data["task"] = st.selectbox("Task", TASKS, index=TASKS.index(data["task"]),
                                    key="dm_task")
        label_inputs(data)
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
                            "Architecture", default_sections()["model"]["source"],
                            middle=("Real architecture", "hfarch:"))
    if isinstance(picked, str):  # a transformers vision classifier, random weights
        real_architecture(model)
    elif picked is not None:
        entry, _ = picked
        uses = entry.extra["uses"]
        model["source"] = f"builtin:{entry.name}"
        try:
            architecture_inputs(model, uses)
        except Exception as exc:
            show_error(exc, LABELS)
    else:
        upload = st.file_uploader(
            f"A ZIP of a Hugging Face folder (config.json, model.safetensors) or of a "
            f"workbench bundle, a .pt2 (torch.export), a .pt state_dict or TorchScript, or "
            f".onnx, up to {UPLOAD_LIMIT_MB} MB; files are never unpickled",
            type=["zip", "pt2", "pt", "pth", "onnx"], key="dm_model_file")
        if upload is not None:
            try:
                stored = save_upload(upload, uploads)
                model["source"] = (unpack_model_folder(stored, uploads)
                                   if stored.suffix.lower() == ".zip" else str(stored))
            except UserError as exc:
                show_error(exc)
        archs = [None, *MODELS.names()]
        model["architecture"] = st.selectbox(
            "Architecture of a state_dict", archs, index=archs.index(model["architecture"]),
            format_func=lambda a: a or "(not a state_dict)", key="dm_state_arch",
            help="A state_dict holds weights only: pick the architecture they belong to "
                 "and give its sizes here.")
        if model["architecture"] is not None:  # what a state_dict needs, asked here
            try:
                architecture_inputs(model, MODELS.get(model["architecture"]).extra["uses"])
            except Exception as exc:
                show_error(exc, LABELS)

try:  # the data and the model are loaded and built before they become the selection
    checked = resolve({"data": data, "model": model})
    data_summary = data_preview(json.dumps(checked.to_dict()["data"]), 0, checked.model.source)
    model_summary = model_preview(json.dumps(checked.to_dict()["model"]),
                                  json.dumps(checked.to_dict()["data"]))
except Exception as exc:
    show_error(exc, LABELS)
    st.caption(f"Nothing changed: the other pages go on with **{describe(sel['data'])}** and "
               f"**{describe(sel['model'])}** until this is fixed.")
else:
    sel["data"], sel["model"] = data, model  # only what loaded and built is kept
    with right:
        show_data(data_summary)
    with mright:
        show_model(model_summary)
    st.page_link("views/train.py", label="Train this model", icon=":material/play_arrow:")
