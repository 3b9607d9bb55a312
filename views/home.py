"""Home: what the workbench does, the one-press Showcase, and where to start with your own."""

import streamlit as st

from engine.store import Store
from views.common import show_error
from views.warmup import engine_loaded

st.title("Model optimization workbench")
st.markdown("Train, tune and compress a model by pointing and clicking, then see what each "
            "technique bought: **accuracy, size and latency side by side**. Everything runs "
            "headless from a recipe file too, so what you see here replays in a pipeline.")

LINKS = [("views/data_model.py", "Pick data and a model", ":material/dataset:"),
         ("views/train.py", "Train, or race optimizers", ":material/model_training:"),
         ("views/compress.py", "Compress with a chain of techniques", ":material/compress:"),
         ("views/diagnose.py", "Diagnose bias and variance", ":material/troubleshoot:"),
         ("views/compare.py", "Compare runs and download a report", ":material/scatter_plot:")]
BUTTON = {"label": "Showcase", "type": "primary", "key": "home_showcase",
          "icon": ":material/play_circle:",
          "help": "Submits the showcase's recipes to background workers (only those not "
                  "already done or running) and opens Compare."}

left, right = st.columns([3, 2])
with right:
    st.subheader("Your own model")
    for path, label, icon in LINKS:
        st.page_link(path, label=label, icon=icon)
with left:
    st.subheader("Showcase")


@st.fragment(run_every=1.0)
def waiting() -> None:
    """A press made while the engine loads (seconds on a fresh server), kept: once loaded,
    the whole page runs again and launches it. No script of this page waits on torch's
    import (a press that imported it left Streamlit's frontend on a blank Compare page, the
    browser test on a fresh clone, 2026-12-04), and nothing ticks before a press (ticks
    every half second slowed the engine's import from 9 s to 15 s on two cores)."""
    if engine_loaded():
        st.rerun()
    st.info("Starting the showcase as soon as the engine has loaded (a few seconds on a "
            "fresh start).", icon=":material/hourglass_top:")


def pitch() -> None:
    """What the Showcase runs, by name, and how many of its runs are already finished:
    the engine's recipes, so only once it is loaded."""
    from engine import showcase  # imported already by the warm-up: no cost

    entries = showcase.recipes()
    st.markdown(
        "One press, on the built-in `digits` images and an MLP: a **baseline**, an "
        "**optimizer race** (" + ", ".join(showcase.RACE) + "), then one run per technique: "
        + ", ".join(f"**{e.label}**" for e in entries if e.kind == "compress") + ". You land on "
        "Compare, where the Pareto plots fill in as each variant is measured (about 10 s on "
        "two quiet CPU cores). A second press reuses the runs already finished.")
    done = showcase.existing(Store())
    ready = sum(1 for e in entries if done.get(e.key, {}).get("status") == "done")
    if ready:
        st.caption(f"{ready} of {len(entries)} showcase runs are already finished in this "
                   f"store; pressing again shows them at once.")


@st.fragment(run_every=2.0)
def pitch_once_loaded() -> None:
    """The pitch of a Home drawn while the engine loads: the short one, then, at the first
    tick after the load, the whole one. Only this fragment redraws: a whole-app rerun from a
    tick (tried) swallowed a Showcase press made at that moment, 3 presses in 9 near the
    load, and the visitor stayed on Home."""
    if engine_loaded():
        pitch()
    else:
        st.markdown("One press, on the built-in `digits` images and an MLP: a **baseline**, "
                    "an **optimizer race**, then one run per compression technique, and you "
                    "land on Compare as the Pareto plots fill in.")


if not engine_loaded():
    with left:
        pitch_once_loaded()
        if st.button(**BUTTON):
            st.session_state["showcase_pressed"] = True
        if st.session_state.get("showcase_pressed"):
            waiting()
    st.stop()

from engine import showcase  # noqa: E402  (imported already by the warm-up: no cost)

with left:
    pitch()
    pressed = st.button(**BUTTON)
    if pressed or st.session_state.pop("showcase_pressed", False):
        try:
            launch = showcase.launch(Store())
            st.session_state["showcase_runs"] = launch.run_ids
            st.session_state["showcase_launch"] = {"submitted": len(launch.submitted),
                                                   "reused": len(launch.reused)}
            st.switch_page("views/compare.py")
        except Exception as exc:
            show_error(exc)
