"""Train: every optimizer, schedule and regularizer from the engine, a run, its live curves."""

import uuid

import streamlit as st

from engine import plots
from engine.optimizers import OPTIMIZERS
from engine.recipe import PRECISIONS
from engine.runner import resolve
from engine.schedules import SCHEDULES, preview
from engine.showcase import race_entrant
from views import train_inputs
from views.common import (
    default_sections,
    describe,
    recipe_download,
    registry_choice,
    selection,
    show_error,
    submit,
)
from views.live import onnx_only, watch
from views.workspace import remember

# recipe keys as the boxes on this page that set them, for its messages
LABELS = {"train.lr": "Learning rate", "train.epochs": "Epochs", "train.batch_size": "Batch size",
          "train.optimizer_options": "Optimizer settings", "train.optimizer": "Optimizer",
          "train.schedule": "Schedule", "train.l1": "L1 penalty",
          "train.l2": "L2 penalty (coupled)", "train.weight_decay": "Weight decay (decoupled)",
          "train.grad_clip": "Max gradient norm", "train.early_stopping": "Early stopping",
          "train.precision": "Precision", "model.dropout": "Dropout"}

st.title("Train")
sel = selection()
defaults = default_sections()["train"]
cfg = st.session_state.setdefault("train_cfg", dict(defaults))
st.caption(f"Data: **{describe(sel['data'])}** · Model: **{describe(sel['model'])}**")
st.page_link("views/data_model.py", label="Change data or model", icon=":material/tune:")
if sel["model"]["source"].lower().endswith(".onnx"):  # no optimizer would do anything
    onnx_only(sel)
    st.stop()

opt_col, sched_col, reg_col = st.columns(3)
with opt_col:
    st.subheader("Optimizer")
    name, options, opt_problem = registry_choice(OPTIMIZERS, "Optimizer", "tr_opt",
                                                 cfg["optimizer"],
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
    sched_name, sched_opts, sched_problem = registry_choice(
        SCHEDULES, "Schedule", "tr_sched", schedule["name"],
        {k: v for k, v in schedule.items() if k not in ("name", "warmup_epochs")})
    warmup = schedule.get("warmup_epochs", defaults["schedule"]["warmup_epochs"])
    warmup = int(st.number_input("Linear warm-up (epochs)", 0, max(0, epochs - 1),
                                 min(int(warmup), epochs - 1), key="tr_warmup"))
    schedule = {"name": sched_name, "warmup_epochs": warmup, **sched_opts}
with reg_col:
    reg = train_inputs.regularization(cfg, sel["model"], defaults)

cfg.update(optimizer=name, optimizer_options=options, lr=lr, momentum=None,  # an option now
           batch_size=batch, epochs=epochs, schedule=schedule, precision=precision,
           compile=compiled, **{k: reg[k] for k in ("l1", "l2", "weight_decay",
                                                     "early_stopping", "grad_clip")})
raw = {"seed": reg["seed"], "data": sel["data"], "model": {**sel["model"],
                                                        "dropout": reg["dropout"]},
       "train": cfg}
recipe, problem = None, opt_problem or sched_problem  # shown under its box already
if problem is None:
    try:
        recipe = resolve(raw)
        with sched_col:
            st.plotly_chart(plots.lr_schedule(preview(recipe.train.schedule, lr, epochs)),
                            key="tr_lr_preview")
    except Exception as exc:
        problem = show_error(exc, LABELS)

race = train_inputs.race()

run_col, dl_col = st.columns([1, 4])
if recipe is not None:
    with dl_col:
        recipe_download(recipe.to_dict(), key="tr_download")
# Run stays on the page, disabled with the reason, while the settings cannot run
if run_col.button("Run", type="primary", key="tr_run", icon=":material/play_arrow:",
                  disabled=recipe is None, help=problem) and recipe is not None:
    try:
        if race:
            group, (vary, chosen) = uuid.uuid4().hex[:8], race
            ids = [submit({**raw, "train": race_entrant(cfg, vary, choice)}, group=group,
                          threads=1, name=f"{recipe.title()} · {choice}")
                   for choice in chosen]
        else:
            ids = [submit(recipe, name=f"{recipe.title()} · {name}")]
        remember("watch", ids)
    except Exception as exc:
        show_error(exc)

if st.session_state.get("watch"):
    st.subheader("Live")
    watch(st.session_state["watch"], key="tr_live")
