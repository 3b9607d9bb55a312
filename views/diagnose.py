"""Diagnose: is the model underfitting or overfitting, and what should change?"""

import streamlit as st

from engine import plots
from engine.recipe import VALIDATION_PARAMS
from engine.runner import resolve
from engine.store import Store
from views.common import (
    default_sections,
    describe,
    selection,
    show_error,
    submit,
    train_settings,
)
from views.live import watch
from views.workspace import kept, remember, save_workspace

VERDICTS = {"high_bias": ("High bias: the model underfits.", st.warning),
            "high_variance": ("High variance: the model overfits.", st.warning),
            "good_fit": ("Good fit: training and validation agree.", st.success)}
PARTS = ("learning_curve", "validation_curve", "bias_variance", "landscape")
# the engine's defaults: which parts a diagnosis runs, and each part's own settings
RUNS = default_sections({"diagnose": {}})["diagnose"]
PART = default_sections({"diagnose": {part: {} for part in PARTS}})["diagnose"]
FRACTIONS = sorted({0.1, 0.25, 0.5, 0.75, 1.0, *PART["learning_curve"]["fractions"]})
# values to try per complexity knob; the engine's default knob (model.hidden) brings its own
KNOBS = {"model.dropout": [0.0, 0.2, 0.5], "train.l2": [0.0, 0.001, 0.01, 0.1],
         "train.weight_decay": [0.0, 0.01, 0.1], "train.epochs": [5, 15, 30, 60],
         PART["validation_curve"]["param"]: PART["validation_curve"]["values"]}

st.title("Diagnose")
save_workspace()  # this page's settings as the last change left them: a reload keeps them
sel = selection()
train_cfg = train_settings()
st.caption(f"Model **{describe(sel['model'])}** on **{describe(sel['data'])}** with "
           f"{train_cfg['optimizer']}, {train_cfg['epochs']} epochs (the Train page's settings).")

left, right = st.columns(2)
with left:
    use_lc = st.checkbox("Learning curve", kept("dg_lc", RUNS["learning_curve"] is not None),
                         key="dg_lc")
    fractions = st.multiselect("Training fractions", FRACTIONS, [f for f in kept(
        "dg_fractions", PART["learning_curve"]["fractions"]) if f in FRACTIONS],
        key="dg_fractions", disabled=not use_lc)
    use_vc = st.checkbox("Validation curve", kept("dg_vc", RUNS["validation_curve"] is not None),
                         key="dg_vc")
    knob = kept("dg_knob", PART["validation_curve"]["param"])
    knob = st.selectbox("Complexity knob", VALIDATION_PARAMS, key="dg_knob",
                        index=VALIDATION_PARAMS.index(knob if knob in VALIDATION_PARAMS else
                                                      PART["validation_curve"]["param"]),
                        disabled=not use_vc)
with right:
    use_bv = st.checkbox("Bias-variance decomposition",
                         kept("dg_bv", RUNS["bias_variance"] is not None), key="dg_bv")
    rounds = int(st.number_input("Bootstrap rounds", 2, 200,
                                 kept("dg_rounds", PART["bias_variance"]["rounds"]),
                                 key="dg_rounds", disabled=not use_bv))
    use_cx = st.checkbox("Complexity (parameters, FLOPs, Rademacher)",
                         kept("dg_cx", RUNS["complexity"]), key="dg_cx")
    use_ls = st.checkbox("Loss landscape", kept("dg_ls", RUNS["landscape"] is not None),
                         key="dg_ls")
    two_d = st.checkbox("2-D landscape", kept("dg_ls2", PART["landscape"]["two_d"]),
                        key="dg_ls2", disabled=not use_ls)
    points = int(st.number_input("Landscape points per direction", 3, 101,
                                 kept("dg_ls_points", PART["landscape"]["points"]),
                                 key="dg_ls_points",
                                 disabled=not use_ls,
                                 help="A 2-D landscape evaluates the square of this."))

diagnose = {"learning_curve": {"fractions": sorted(fractions)} if use_lc and fractions
            else None,
            "validation_curve": {"param": knob, "values": KNOBS[knob]} if use_vc else None,
            "bias_variance": {"rounds": rounds} if use_bv else None, "complexity": use_cx,
            "landscape": {"two_d": two_d, "points": points} if use_ls else None}
recipe, problem = None, None
try:
    recipe = resolve({"data": sel["data"], "model": sel["model"], "train": train_cfg,
                      "diagnose": diagnose})
except Exception as exc:
    problem = show_error(exc)  # the button stays, disabled with this reason
try:
    if st.button("Diagnose", type="primary", key="dg_run", icon=":material/troubleshoot:",
                 disabled=recipe is None, help=problem) and recipe is not None:
        remember("dg_watch", submit(recipe, name=f"diagnose · {recipe.title()}"))
except Exception as exc:
    show_error(exc)

run_id = st.session_state.get("dg_watch")
if run_id:
    watch([run_id], key="dg_live")
    run = Store().get_run(run_id)
    found = ((run or {}).get("result") or {}).get("diagnostics") or {}
    if found.get("verdict"):
        headline, box = VERDICTS[found["verdict"]]
        box(headline + " " + " ".join(found["reasons"]))
        st.markdown("**What to try next**\n" + "\n".join(f"- {s}" for s in
                                                          found["suggestions"]))
    charts = [(plots.learning_curve, "learning_curve"), (plots.validation_curve,
               "validation_curve"), (plots.bias_variance, "bias_variance"),
              (plots.landscape, "landscape")]
    shown = [(fn, found[key], key) for fn, key in charts if found.get(key)]
    for i in range(0, len(shown), 2):
        cols = st.columns(2)
        for col, (fn, data, key) in zip(cols, shown[i:i + 2], strict=False):
            col.plotly_chart(fn(data), key=f"dg_{key}")
    if found.get("bias_variance", {}).get("combination"):
        st.caption(found["bias_variance"]["combination"])
    if found.get("complexity"):
        cx = found["complexity"]
        cols = st.columns(4)
        cols[0].metric("parameters", f"{cx['params']:,}")
        cols[1].metric("non-zero", f"{cx['nonzero_params']:,}")
        cols[2].metric("FLOPs / sample", f"{cx['flops']:,}")
        rad = cx.get("rademacher") or {}
        cols[3].metric("fits random labels", f"{rad.get('fit', 0):.2f}",
                       help="Empirical Rademacher estimate: 0 = cannot memorize random "
                            "labels, 1 = memorizes them perfectly.")
