"""Widgets shared by the pages: the current selection, registry-driven inputs, errors.

No business logic here: defaults come from the engine's dataclasses and registries, work
goes to the engine, results come from the store.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import streamlit as st

import engine
from engine.errors import UserError
from engine.registry import Param
from engine.store import Store
from engine.uploads import check_upload, safe_name, upload_limit_mb

# the engine's cap (WORKBENCH_UPLOAD_LIMIT_MB) or the server's (server.maxUploadSize in
# .streamlit/config.toml), whichever is smaller: the one a user actually meets
UPLOAD_LIMIT_MB = min(upload_limit_mb(), int(st.get_option("server.maxUploadSize")))


@st.cache_data
def default_sections(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's defaults, from the engine's dataclasses and registries (never a second
    copy). `raw` switches on optional sections to read theirs: {"diagnose": {}}."""
    return engine.resolve(raw or {}).to_dict()


# what a workspace keeps across a reload: the selection, the Train settings, the Compress
# chain and Compare's runs, and the runs each page watches
WORKSPACE_KEYS = ("selection", "train_cfg", "cmp_chain", "cmp_runs", "watch", "tu_watch",
                  "dg_watch", "cmp_watch")


# page settings kept with the workspace, by widget key prefix (the Tune and Diagnose pages';
# Train's live in train_cfg); buttons are not settings
WIDGET_PREFIXES = ("tu_", "dg_")


def kept(key: str, default: Any) -> Any:
    """The value this workspace last had in widget `key` (restored after a reload), else
    `default`: what a page passes as the widget's starting value."""
    return st.session_state.get("widgets", {}).get(key, default)


def session_owner() -> str:
    """This workspace's tag on the runs it starts, so two people on one instance each follow
    their own: kept in the URL (?ws=...), so a reload or a second tab of that URL is the same
    workspace, with the same runs."""
    if "owner" not in st.session_state:
        given = st.query_params.get("ws", "")
        valid = len(given) == 32 and all(c in "0123456789abcdef" for c in given)
        st.session_state["owner"] = given if valid else uuid.uuid4().hex
    if st.query_params.get("ws") != st.session_state["owner"]:
        st.query_params["ws"] = st.session_state["owner"]  # a page switch drops it
    return st.session_state["owner"]


def restore_workspace() -> None:
    """Once per browser session: what this workspace had open, from the store."""
    if st.session_state.get("workspace_restored"):
        return
    st.session_state["workspace_restored"] = True
    for key, value in Store().workspace(session_owner()).items():
        if (key in WORKSPACE_KEYS or key == "widgets") and key not in st.session_state:
            st.session_state[key] = value


def save_workspace() -> None:
    """Write what this workspace has open to the store (cheap: one small row)."""
    state = {k: st.session_state[k] for k in WORKSPACE_KEYS if k in st.session_state}
    widgets = dict(st.session_state.get("widgets", {}))
    widgets.update({k: v for k, v in st.session_state.items()
                    if isinstance(k, str) and k.startswith(WIDGET_PREFIXES)
                    and k not in WORKSPACE_KEYS and not k.endswith(("_run", "_btn"))
                    and isinstance(v, bool | int | float | str | list)})
    st.session_state["widgets"] = widgets
    Store().save_workspace(session_owner(), {**state, "widgets": widgets})


def remember(key: str, value: Any) -> None:
    """Set `key` in this session and save the workspace at once (a run just started must
    survive a reload that comes before the next rerun)."""
    st.session_state[key] = value
    save_workspace()


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
    source = section["source"]
    return source.removeprefix("builtin:") if source.startswith("builtin:") else Path(
        source).name


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
            raise UserError(f"{label} must be JSON, such as {json.dumps(param.default)}."
                            ) from None
    return st.text_input(label, value=str(value), key=key, help=param.help)


def int_list(text: str, what: str) -> list[int]:
    """'128, 64' -> [128, 64]; a bad list is a UserError naming the field."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what} must be whole numbers separated by commas, such as "
                        f"'128, 64'.") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} needs at least one positive width, such as '128, 64'.")
    return values


def save_upload(upload: Any, folder: Path) -> Path:
    """Write an uploaded file into `folder` under its content hash and a sanitized name, after
    the engine's checks (size cap, archives, pickles, ONNX external data); a refused file is
    never written, and nothing is ever unpacked or executed."""
    data = upload.getvalue()
    name = safe_name(upload.name)
    check_upload(name, data)
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}_{name}"
    if not path.exists():
        path.write_bytes(data)
    st.session_state.setdefault("upload_names", {})[path.name] = upload.name
    return path


def recipe_download(recipe: dict[str, Any], key: str) -> None:
    st.download_button("Download recipe (JSON)", json.dumps(recipe, indent=2),
                       file_name="recipe.json", mime="application/json", key=key,
                       help="Replay it headless: python -m engine run recipe.json --out DIR")


def show_error(exc: Exception, labels: dict[str, str] | None = None) -> None:
    """A user's mistake as one sentence on the page; anything else as a short notice.
    `labels` maps recipe keys to the boxes on the page that set them, so the sentence names
    what the user sees ("Missing values", not data.missing); an upload is named as it was
    uploaded, not by the name it is stored under."""
    if isinstance(exc, UserError):
        text = str(exc)
        for stored, given in st.session_state.get("upload_names", {}).items():
            text = text.replace(stored, given)
        for key, label in sorted((labels or {}).items(), key=lambda kv: -len(kv[0])):
            text = text.replace(key, f"\u201c{label}\u201d")
        st.error(text)
    else:
        st.error(f"Something went wrong inside the engine ({type(exc).__name__}: {exc}). "
                 f"Your settings are kept; try again or report it.")


def json_list(text: str, box: str, example: str) -> list[Any]:
    """The JSON list typed into the box labelled `box`, or a UserError naming that box."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not value:
        raise UserError(f"The box {box!r} needs a JSON list such as {example}; "
                        f"{text.strip()[:40]!r} is not one yet.")
    return value


def registry_choice(registry: Any, label: str, key: str, current: str,
                    options: dict[str, Any], *, names: list[str] | None = None
                    ) -> tuple[str, dict[str, Any]]:
    """A technique from a registry and its own settings, each widget built from its Param."""
    names = names or registry.names()
    name = st.selectbox(label, names, index=names.index(current) if current in names else 0,
                        key=key, help="; ".join(f"{e.name}: {e.description}" for e in registry
                                                if e.name in names))
    entry = registry.get(name)
    st.caption(entry.description)
    values = options if name == current else {}
    if entry.params:
        with st.expander(f"{name} settings"):
            values = {p.name: param_input(p, f"{key}_{name}_{p.name}", values.get(p.name))
                      for p in entry.params}
    return name, values
