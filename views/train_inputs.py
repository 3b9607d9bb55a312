"""The Train page's regularization column and race settings, each read from the engine."""

from typing import Any

import streamlit as st

from engine.optimizers import OPTIMIZERS
from engine.registry import Param
from engine.regularization import REGULARIZERS
from engine.schedules import SCHEDULES
from engine.showcase import RACE, RACE_SCHEDULES
from views.common import default_sections, param_input
from views.workspace import kept


def regularizer(name: str, param: str | None = None) -> Param:
    """A regularizer's registry parameter: its default, bounds and help."""
    return REGULARIZERS.get(name).param(param or name)


def regularization(cfg: dict[str, Any], model: dict[str, Any], defaults: dict[str, Any]
                   ) -> dict[str, Any]:
    """L1, L2, weight decay, dropout, early stopping, clipping and the seed, as values."""
    st.subheader("Regularization")
    out: dict[str, Any] = {
        "l1": param_input(regularizer("l1"), "tr_l1", cfg["l1"], label="L1 penalty"),
        "l2": param_input(regularizer("l2"), "tr_l2", cfg["l2"], label="L2 penalty (coupled)"),
        "weight_decay": param_input(regularizer("weight_decay"), "tr_wd", cfg["weight_decay"],
                                    label="Weight decay (decoupled)")}
    drop = regularizer("dropout")
    out["dropout"] = st.slider("Dropout", float(drop.low), float(drop.high),
                               float(kept("tr_dropout", model["dropout"])), 0.05,
                               key="tr_dropout", help=drop.help)
    stopping = st.checkbox("Early stopping", cfg["early_stopping"] is not None, key="tr_es")
    wait = regularizer("early_stopping", "patience")
    patience = int(st.number_input(
        "Patience (epochs)", min_value=int(wait.low), help=wait.help,
        max_value=int(wait.high) if wait.high is not None else None,
        value=int((cfg["early_stopping"] or defaults["early_stopping"])["patience"]),
        key="tr_patience", disabled=not stopping))
    out["early_stopping"] = ({**defaults["early_stopping"], "patience": patience}
                             if stopping else None)
    clip = st.checkbox("Gradient clipping", cfg["grad_clip"] is not None, key="tr_clip")
    clip_norm = st.number_input("Max gradient norm", 1e-4, 1e4, float(cfg["grad_clip"] or 1.0),
                                format="%g", key="tr_clip_norm", disabled=not clip)
    out["grad_clip"] = clip_norm if clip else None
    out["seed"] = int(st.number_input("Seed", 0, 2**31 - 1,
                                      int(kept("tr_seed", default_sections()["seed"])),
                                      key="tr_seed"))
    return out


def race() -> tuple[str, list[str]] | None:
    """What a race varies and its entrants, or None when the page runs one model."""
    if not st.toggle("Race: the same model with several optimizers or schedules, side by "
                     "side", bool(kept("tr_race", False)), key="tr_race"):
        return None
    kinds = ["optimizer", "schedule"]
    vary = st.radio("Vary", kinds, horizontal=True, key="tr_race_kind",
                    index=kinds.index(kept("tr_race_kind", "optimizer")))
    pool = OPTIMIZERS.names() if vary == "optimizer" else SCHEDULES.names()
    picks = RACE if vary == "optimizer" else RACE_SCHEDULES
    picks = kept("tr_race_pick", picks) if vary == kept("tr_race_kind", "optimizer") else picks
    chosen = st.multiselect(f"{vary.capitalize()}s to race", pool, key="tr_race_pick",
                            default=[n for n in picks if n in pool])
    st.caption("Each optimizer uses its own default learning rate and batch size in a race." if
               vary == "optimizer" else "Every schedule starts from the learning rate above.")
    return (vary, chosen) if chosen else None
