"""Home: what the workbench does, the one-press Showcase, and where to start with your own."""

import streamlit as st

from engine.store import Store
from views.common import show_error

st.title("Model optimization workbench")
st.markdown("Train, tune and compress a model by pointing and clicking, then see what each "
            "technique bought: **accuracy, size and latency side by side**. Everything runs "
            "headless from a recipe file too, so what you see here replays in a pipeline.")

# After the heading: the showcase resolves recipes, which loads torch (about 3 s at start).
# The button waits for it: drawn before, with the import on the press, the press's long
# script left Streamlit's frontend on a blank Compare page (the browser test on a fresh
# clone, 2026-12-04; README, "Timings")
from engine import showcase  # noqa: E402

entries = showcase.recipes()
left, right = st.columns([3, 2])
with left:
    st.subheader("Showcase")
    st.markdown(
        "One press, on the built-in `digits` images and an MLP: a **baseline**, an "
        "**optimizer race** (" + ", ".join(showcase.RACE) + "), then one run per technique: "
        + ", ".join(f"**{e.label}**" for e in entries if e.kind == "compress") + ". You land on "
        "Compare, where the Pareto plots fill in as each variant is measured (about 20 s on "
        "two quiet CPU cores). A second press reuses the runs already finished.")
    if st.button("Showcase", type="primary", key="home_showcase", icon=":material/play_circle:",
                 help="Submits the showcase's recipes to background workers (only those not "
                      "already done or running) and opens Compare."):
        try:
            launch = showcase.launch(Store())
            st.session_state["showcase_runs"] = launch.run_ids
            st.session_state["showcase_launch"] = {"submitted": len(launch.submitted),
                                                   "reused": len(launch.reused)}
            st.switch_page("views/compare.py")
        except Exception as exc:
            show_error(exc)
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
