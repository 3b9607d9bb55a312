"""The workspace: what one URL's session has open, kept in the store so a reload or a second
tab of that URL (`?ws=...`) opens the same selection, settings and watched runs."""

from __future__ import annotations

import json
import uuid
from typing import Any

import streamlit as st

from engine.store import Store

# what a workspace keeps across a reload: the selection, the Train settings, the Compress
# chain and Compare's runs, and the runs each page watches
WORKSPACE_KEYS = ("selection", "train_cfg", "cmp_chain", "cmp_runs", "watch", "tu_watch",
                  "dg_watch", "cmp_watch", "ac_watch")


# page settings kept with the workspace, by widget key prefix (the Tune and Diagnose pages',
# Train's seed, dropout and race, Compress's starting point and heatmap; Train's other
# settings live in train_cfg); buttons are not settings
WIDGET_PREFIXES = ("tu_", "dg_", "tr_seed", "tr_dropout", "tr_race", "cmp_start", "cmp_sens",
                   "ac_")


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
    text = json.dumps({**state, "widgets": widgets}, sort_keys=True, default=str)
    if st.session_state.get("workspace_saved") != text:  # a rerun that changed nothing
        st.session_state["workspace_saved"] = text  # writes nothing
        Store().save_workspace(session_owner(), {**state, "widgets": widgets})


def remember(key: str, value: Any) -> None:
    """Set `key` in this session and save the workspace at once (a run just started must
    survive a reload that comes before the next rerun)."""
    st.session_state[key] = value
    save_workspace()


