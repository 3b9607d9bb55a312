"""The Data & Model page's pickers: a built-in or an upload, and an architecture's sizes."""

from __future__ import annotations

from typing import Any

import streamlit as st

from engine.hf import ARCHITECTURES as HF_ARCHITECTURES
from engine.recipe import ACTIVATIONS, LABEL_SPACES, LABELS
from engine.schema import int_list


def builtin_choice(label: str, source: str, registry: Any, keys: tuple[str, str], choice: str,
                   fallback: str, help: str | None = None, *,
                   middle: tuple[str, str] | None = None) -> tuple[Any, bool] | str | None:
    """"Built-in" or "Upload" for a source, and on "Built-in" the registry entry picked
    (with its description) and whether it is the one `source` already names; None on
    "Upload". `fallback` is the recipe's default source, offered after an upload.
    `middle` is (option, source prefix): a third choice between them, returned as its
    name when picked (the real architectures of the Model section)."""
    builtin = source.startswith("builtin:")
    options = ["Built-in", *([middle[0]] if middle else []), "Upload"]
    index = 0 if builtin else (1 if middle and source.startswith(middle[1]) else
                               len(options) - 1)
    kind = st.radio(label, options, index=index, horizontal=True, key=keys[0])
    if kind == "Upload":
        return None
    if kind != "Built-in":
        return kind
    names = registry.names()
    current = (source if builtin else fallback).removeprefix("builtin:")
    name = st.selectbox(choice, names, index=names.index(current), key=keys[1], help=help)
    entry = registry.get(name)
    st.caption(entry.description)
    return entry, builtin and name == current


def architecture_inputs(model: dict[str, Any], uses: tuple[str, ...]) -> None:
    """The settings the architecture is built from, into `model` (a built-in's, or those a
    state_dict upload needs to be rebuilt)."""
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


def label_inputs(data: dict[str, Any]) -> None:
    """Where the labels come from and what an integer label means, into `data`."""
    for key, label, menu, help in (
            ("labels", "Labels", LABELS, "Label-free: a pretrained model and unlabeled "
             "samples (an NPZ with X alone, a ZIP of images in one folder); every variant is "
             "scored by its top-1 agreement with the original model, or, with Task "
             "regression (an embedder: outputs that are not classes), by the mean cosine "
             "similarity of its outputs to the original's."),
            ("label_space", "Integer labels", LABEL_SPACES, "Indices into the model's "
             "outputs: for a pretrained classifier whose labels are its own class ids "
             "(ImageNet's 1000, say); its head is kept.")):
        names = list(menu)
        data[key] = st.selectbox(label, names, index=names.index(data.get(key, names[0])),
                                 key=f"dm_{key}", format_func=menu.get, help=help)


def real_architecture(model: dict[str, Any]) -> None:
    """A transformers vision classifier by name (random weights), into `model`."""
    names = list(HF_ARCHITECTURES)
    current = model["source"].removeprefix("hfarch:")
    name = st.selectbox("Architecture (transformers, random init)", names,
                        index=names.index(current) if current in names else 0,
                        format_func=lambda n: f"{n}: {HF_ARCHITECTURES[n][2]}",
                        key="dm_hfarch", help="Built offline from a transformers config at a "
                        "small size; upload a Hugging Face folder (ZIP) for pretrained "
                        "weights. Needs image data (try the shapes dataset).")
    model.update(source=f"hfarch:{name}", architecture=None)

