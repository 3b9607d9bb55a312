"""Train: every optimizer, schedule and regularizer from the engine, a run, its live curves."""

import uuid

import streamlit as st

from engine import plots
from engine.optimizers import OPTIMIZERS
from engine.recipe import PRECISIONS
from engine.registry import Param
from engine.regularization import REGULARIZERS
from engine.runner import resolve
from engine.schedules import SCHEDULES, preview
from engine.showcase import RACE
from pages.common import (
    default_sections,
    describe,
    param_input,
    recipe_download,
    registry_choice,
    selection,
    show_error,
    submit,
)
from pages.live import onnx_only, watch
from pages.workspace import remember


def regularizer(name: str, param: str | None = None) -> Param:
    """A regularizer's registry parameter: its default, bounds and help."""
    return REGULARIZERS.get(name).param(param or name)


st.title("Train")
sel = selection()
defaults = default_sections()["train"]
cfg = st.session_state.setdefault("train_cfg", dict(defaults))
st.caption(f"Data: **{describe(sel['data'])}** · Model: **{describe(sel['model'])}**")
st.page_link("pages/data_model.py", label="Change data or model", icon=":material/tune:")
if sel["model"]["source"].lower().endswith(".onnx"):  # no optimizer would do anything
    onnx_only(sel)
    st.stop()

opt_col, sched_col, reg_col = st.columns(3)
with opt_col:
    st.subheader("Optimizer")
    name, options = registry_choice(OPTIMIZERS, "Optimizer", "tr_opt", cfg["optimizer"],
                                    cfg.get("optimizer_options", {}))
    entry = OPTIMIZERS.get(name)
    lr = st.number_input("Learning rate", min_value=1e-7, max_value=100.0, format="%g",
                         value=float(cfg["lr"] if name == cfg["optimizer"] and cfg["lr"]
                                     else entry.extra["default_lr"]), key=f"tr_lr_{name}")
    batch = "full" if entry.extra.get("closure") else cfg["batch_size"]
    sizes = list(dict.fromkeys(["full", 1, 8, 16, 32, 64, 128, 256, 512, batch]))
    batch = st.selectbox("Batch size", sizes, index=sizes.index(batch), key=f"tr_batch_{name}",
                         help="full: batch gradient descent; 1: stochastic; otherwise "
                              "mini-batch.")
    epochs = int(st.number_input("Epochs", 1, 5000, int(cfg["epochs"]), key="tr_epochs"))
    with st.expander("Speed"):
        precision = st.selectbox("Precision", PRECISIONS, key="tr_precision",
                                 index=PRECISIONS.index(cfg.get("precision",
                                                                defaults["precision"])),
                                 help="auto: bf16 autocast on a GPU, float32 on the CPU; bf16 "
                                      "also autocasts on the CPU (slower without bf16 units).")
        compiled = st.checkbox("Compile the model (torch.compile)", bool(cfg.get("compile")),
                               key="tr_compile", help="The first epoch pays for compiling "
                               "(tens of seconds on a CPU); worth it for long runs on a GPU.")
with sched_col:
    st.subheader("Schedule")
    schedule = cfg["schedule"] or defaults["schedule"]  # null: the recipe's default
    sched_name, sched_opts = registry_choice(
        SCHEDULES, "Schedule", "tr_sched", schedule["name"],
        {k: v for k, v in schedule.items() if k not in ("name", "warmup_epochs")})
    warmup = schedule.get("warmup_epochs", defaults["schedule"]["warmup_epochs"])
    warmup = int(st.number_input("Linear warm-up (epochs)", 0, max(0, epochs - 1),
                                 min(int(warmup), epochs - 1), key="tr_warmup"))
    schedule = {"name": sched_name, "warmup_epochs": warmup, **sched_opts}
with reg_col:
    st.subheader("Regularization")
    l1 = param_input(regularizer("l1"), "tr_l1", cfg["l1"], label="L1 penalty")
    l2 = param_input(regularizer("l2"), "tr_l2", cfg["l2"], label="L2 penalty (coupled)")
    wd = param_input(regularizer("weight_decay"), "tr_wd", cfg["weight_decay"],
                     label="Weight decay (decoupled)")
    drop = regularizer("dropout")
    dropout = st.slider("Dropout", float(drop.low), float(drop.high),
                        float(sel["model"]["dropout"]), 0.05, key="tr_dropout", help=drop.help)
    stopping = st.checkbox("Early stopping", cfg["early_stopping"] is not None, key="tr_es")
    wait = regularizer("early_stopping", "patience")
    patience = int(st.number_input(
        "Patience (epochs)", min_value=int(wait.low), help=wait.help,
        max_value=int(wait.high) if wait.high is not None else None,
        value=int((cfg["early_stopping"] or defaults["early_stopping"])["patience"]),
        key="tr_patience", disabled=not stopping))
    clip = st.checkbox("Gradient clipping", cfg["grad_clip"] is not None, key="tr_clip")
    clip_norm = st.number_input("Max gradient norm", 1e-4, 1e4, float(cfg["grad_clip"] or 1.0),
                                format="%g", key="tr_clip_norm", disabled=not clip)
    seed = int(st.number_input("Seed", 0, 2**31 - 1, default_sections()["seed"],
                               key="tr_seed"))

cfg.update(optimizer=name, optimizer_options=options, lr=lr, momentum=None,  # an option now
           batch_size=batch, epochs=epochs, schedule=schedule, l1=l1, l2=l2, weight_decay=wd,
           precision=precision, compile=compiled,
           early_stopping={**defaults["early_stopping"], "patience": patience}
           if stopping else None, grad_clip=clip_norm if clip else None)
raw = {"seed": seed, "data": sel["data"], "model": {**sel["model"], "dropout": dropout},
       "train": cfg}
try:
    recipe = resolve(raw)
    with sched_col:
        st.plotly_chart(plots.lr_schedule(preview(recipe.train.schedule, lr, epochs)),
                        key="tr_lr_preview")
except Exception as exc:
    recipe = None
    show_error(exc)

race = st.toggle("Race: the same model with several optimizers or schedules, side by side",
                 key="tr_race")
if race:
    race_kind = st.radio("Vary", ["optimizer", "schedule"], horizontal=True, key="tr_race_kind")
    pool = OPTIMIZERS.names() if race_kind == "optimizer" else SCHEDULES.names()
    picks = RACE if race_kind == "optimizer" else ["constant", "step", "cosine"]
    chosen = st.multiselect(f"{race_kind.capitalize()}s to race", pool, key="tr_race_pick",
                            default=[n for n in picks if n in pool])
    st.caption("Each optimizer uses its own default learning rate and batch size in a race." if
               race_kind == "optimizer" else "Every schedule starts from the learning rate above.")

run_col, dl_col = st.columns([1, 4])
if recipe is not None:
    with dl_col:
        recipe_download(recipe.to_dict(), key="tr_download")
    if run_col.button("Run", type="primary", key="tr_run", icon=":material/play_arrow:"):
        try:
            if race and chosen:
                group = uuid.uuid4().hex[:8]
                ids = []
                for choice in chosen:
                    train = dict(cfg, schedule={"name": choice}) if race_kind == "schedule" \
                        else dict(cfg, optimizer=choice, lr=None, optimizer_options={},
                                  batch_size="full" if OPTIMIZERS.get(choice).extra.get(
                                      "closure") else cfg["batch_size"])
                    ids.append(submit({**raw, "train": train}, group=group, threads=1,
                                      name=f"{recipe.title()} · {choice}"))
            else:
                ids = [submit(recipe, name=f"{recipe.title()} · {name}")]
            remember("watch", ids)
        except Exception as exc:
            show_error(exc)

if st.session_state.get("watch"):
    st.subheader("Live")
    watch(st.session_state["watch"], key="tr_live")
