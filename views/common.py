"""Widgets shared by the pages: the current selection, registry-driven inputs, errors.

No business logic here: defaults come from the engine's dataclasses and registries, work
goes to the engine, results come from the store.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import streamlit as st

import engine
from engine.errors import UserError, reword, sentence
from engine.recipe import short_source
from engine.registry import Param
from engine.settings import upload_limit_mb
from views.workspace import session_owner

# the engine's cap (WORKBENCH_UPLOAD_LIMIT_MB) or the server's (server.maxUploadSize in
# .streamlit/config.toml), whichever is smaller: the one a user actually meets
UPLOAD_LIMIT_MB = min(upload_limit_mb(), int(st.get_option("server.maxUploadSize")))


@st.cache_data
def default_sections(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's defaults, from the engine's dataclasses and registries (never a second
    copy). `raw` switches on optional sections to read theirs: {"diagnose": {}}."""
    return engine.resolve(raw or {}).to_dict()


def submit(recipe: Any, **kwargs: Any) -> str:
    """`jobs.submit` from a page: the run is tagged with this session (see `session_owner`)."""
    from engine import jobs  # here, not at the top: Home's first render needs no torch

    return jobs.submit(recipe, owner=session_owner(), **kwargs)


def selection() -> dict[str, Any]:
    """The data and model sections chosen on the Data & Model page (defaults: digits, mlp)."""
    if "selection" not in st.session_state:
        defaults = default_sections()
        st.session_state["selection"] = {"data": dict(defaults["data"]),
                                         "model": dict(defaults["model"])}
    return st.session_state["selection"]


def train_settings() -> dict[str, Any]:
    """The Train page's settings, or the recipe's defaults before that page was opened."""
    return st.session_state.get("train_cfg") or default_sections()["train"]


def describe(section: dict[str, Any]) -> str:
    return short_source(section["source"])


def param_input(param: Param, key: str, value: Any = None, *, label: str | None = None) -> Any:
    """One widget for a registry parameter: its type, default, bounds and help."""
    value = param.default if value is None else value
    label = label or param.name.replace("_", " ")
    if param.choices:
        return st.selectbox(label, list(param.choices), index=list(param.choices).index(value),
                            key=key, help=param.help)
    if param.type == "bool":
        return st.checkbox(label, value=bool(value), key=key, help=param.help)
    if param.type == "int":
        return int(st.number_input(label, value=int(value), step=1, key=key, help=param.help,
                                   min_value=int(param.low) if param.low is not None else None,
                                   max_value=int(param.high) if param.high is not None else None))
    if param.type == "float":
        if value is None:  # optional numbers (grad_clip) are switched on by a checkbox
            return None
        return float(st.number_input(label, value=float(value), key=key, help=param.help,
                                     format="%g", min_value=param.low, max_value=param.high))
    if param.type in ("dict", "list[int]", "list[float]"):  # structured values as JSON
        text = st.text_input(label, value=json.dumps(value), key=key, help=param.help)
        try:
            return json.loads(text)
        except ValueError:
            raise UserError(f"{label.capitalize()} must be JSON, such as "
                            f"{json.dumps(param.default)}; fix the box to go on.") from None
    return st.text_input(label, value=str(value), key=key, help=param.help)


def save_upload(upload: Any, folder: Path) -> Path:
    """`engine.uploads.store_upload` of a Streamlit upload; the name it was uploaded under is
    remembered, so messages say that name and not the stored one."""
    # here, not at the top: engine.uploads loads onnx (about 1 s), which every first render
    # of every page would otherwise wait for (views are not the engine's layers)
    from engine.uploads import store_upload

    path = store_upload(upload.name, upload.getvalue(), folder)
    st.session_state.setdefault("upload_names", {})[path.name] = upload.name
    return path


def recipe_download(recipe: dict[str, Any], key: str) -> None:
    st.download_button("Download recipe (JSON)", json.dumps(recipe, indent=2),
                       file_name="recipe.json", mime="application/json", key=key,
                       help="Replay it headless: python -m engine run recipe.json --out DIR")


def show_error(exc: Exception, labels: dict[str, str] | None = None) -> str:
    """A user's mistake as one sentence on the page; anything else as a short notice.
    `labels` maps recipe keys to the boxes on the page that set them, so the sentence names
    what the user sees ("Missing values", not data.missing); an upload is named as it was
    uploaded, not by the name it is stored under. Returns the sentence shown."""
    if isinstance(exc, UserError):
        text = reword(str(exc), labels or {}, st.session_state.get("upload_names", {}))
    else:  # a bug, not the user's: its traceback goes to the server's log, for a report
        traceback.print_exception(exc, file=sys.stderr)
        text = (f"Something went wrong inside the engine ({type(exc).__name__}: {exc}). "
                f"Your settings are kept; try again or report it.")
    st.error(text)
    return text


def table(rows: Any, **kwargs: Any) -> Any:
    """A table of results: no index, and a figure that does not apply reads "—" (Streamlit
    would print a grey "None")."""
    return st.dataframe(rows, hide_index=True, placeholder="—", **kwargs)


def registry_choice(registry: Any, label: str, key: str, current: str,
                    options: dict[str, Any], *, names: list[str] | None = None
                    ) -> tuple[str, dict[str, Any], str | None]:
    """A technique from a registry and its own settings, each widget built from its Param;
    the third value is the first setting's problem (half-typed JSON), shown under its box,
    or None: the page keeps its buttons disabled until it is fixed."""
    names = names or registry.names()
    name = st.selectbox(label, names, index=names.index(current) if current in names else 0,
                        key=key, help="; ".join(f"{e.name}: {e.description}" for e in registry
                                                if e.name in names))
    entry = registry.get(name)
    st.caption(entry.description)
    values = options if name == current else {}
    problem = None
    if entry.params:
        with st.expander(f"{name} settings"):
            chosen: dict[str, Any] = {}
            for p in entry.params:  # a setting that does nothing for the choices above is
                if not p.applies(chosen):  # not shown (and the engine's default stands)
                    continue
                try:
                    chosen[p.name] = param_input(p, f"{key}_{name}_{p.name}", values.get(p.name))
                except UserError as exc:
                    shown = sentence(str(exc))
                    st.error(shown)
                    problem = problem or shown
            values = chosen
    return name, values, problem
