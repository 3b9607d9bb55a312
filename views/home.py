"""Home: what the workbench does, the one-press Showcase, and where to start with your own."""

import streamlit as st

from engine.showcase_plan import RACE, STEPS
from engine.store import Store
from views.common import engine_ready, show_error

st.title("Model optimization workbench")
st.markdown("Train, tune and compress a model by pointing and clicking, then see what each "
            "technique bought: **accuracy, size and latency side by side**. Everything runs "
            "headless from a recipe file too, so what you see here replays in a pipeline.")

left, right = st.columns([3, 2])
with left:
    st.subheader("Showcase")
    st.markdown(
        "One press, on the built-in `digits` images and an MLP: a **baseline**, an "
        "**optimizer race** (" + ", ".join(RACE) + "), then one run per technique: "
        + ", ".join(f"**{label}**" for label, _ in STEPS) + ". You land on "
        "Compare, where the Pareto plots fill in as each variant is measured (about 20 s on "
        "two quiet CPU cores). A second press reuses the runs already finished.")
    if st.button("Showcase", type="primary", key="home_showcase", icon=":material/play_circle:",
                 help="Submits the showcase's recipes to background workers (only those not "
                      "already done or running) and opens Compare."):
        # only on a press: the showcase resolves its recipes, which loads torch (about 3 s
        # at start), and the button need not wait for that (issue 18: live within 5 s)
        from engine import showcase

        try:
            launch = showcase.launch(Store())
            st.session_state["showcase_runs"] = launch.run_ids
            st.session_state["showcase_launch"] = {"submitted": len(launch.submitted),
                                                   "reused": len(launch.reused)}
            st.switch_page("views/compare.py")
        except Exception as exc:
            show_error(exc)
    # once the app's warm-up has loaded the engine (its recipe keys need it), say what a
    # second press would reuse; never make the first render wait for it
    ready, entries = 0, []
    if engine_ready():
        from engine import showcase

        entries = showcase.recipes()
        done = showcase.existing(Store())
        ready = sum(1 for e in entries if done.get(e.key, {}).get("status") == "done")
    if ready:
        st.caption(f"{ready} of {len(entries)} showcase runs are already finished in this "
                   f"store; pressing again shows them at once.")
with right:
    st.subheader("Your own model")
    st.page_link("views/data_model.py", label="Pick data and a model", icon=":material/dataset:")
    st.page_link("views/train.py", label="Train, or race optimizers",
                 icon=":material/model_training:")
    st.page_link("views/compress.py", label="Compress with a chain of techniques",
                 icon=":material/compress:")
    st.page_link("views/diagnose.py", label="Diagnose bias and variance",
                 icon=":material/troubleshoot:")
    st.page_link("views/compare.py", label="Compare runs and download a report",
                 icon=":material/scatter_plot:")
