"""The workbench's entry point: the page list and the sidebar, nothing else.

    streamlit run app.py
"""

import streamlit as st

from engine.progress import progress_of
from engine.store import Store
from views.warmup import device_name, warm_up
from views.workspace import restore_workspace, save_workspace, session_owner

st.set_page_config(page_title="Model optimization workbench", page_icon=":material/speed:",
                   layout="wide")


@st.fragment(run_every=2.0)
def active_runs() -> None:
    """The device, and this session's queued and running runs; others' only counted (two
    people on one instance each follow their own)."""
    st.caption(f"Device: **{device_name()}**")
    runs = Store().active_runs()
    mine = [r for r in runs if r.get("owner") in (session_owner(), None)]
    if len(runs) > len(mine):
        st.caption(f"{len(runs) - len(mine)} more run(s) active from other sessions")
    for run in mine:
        done, text = progress_of(run)
        st.progress(done, text=text)


# A process spawned while this script is the main module (Streamlit's AppTest, a search's
# worker pool) imports it again as __mp_main__: it must define, not run, the app (a CI run
# lost a search worker to the app's store opening there while the database was locked).
if __name__ != "__mp_main__":
    restore_workspace()  # a reload (same ?ws=) opens what this workspace had open
    save_workspace()  # what the last interaction changed (pages save at once what must not wait)
    page = st.navigation([
        st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("views/data_model.py", title="Data & Model", icon=":material/dataset:"),
        st.Page("views/train.py", title="Train", icon=":material/model_training:"),
        st.Page("views/tune.py", title="Tune", icon=":material/tune:"),
        st.Page("views/diagnose.py", title="Diagnose", icon=":material/troubleshoot:"),
        st.Page("views/compress.py", title="Compress", icon=":material/compress:"),
        st.Page("views/compare.py", title="Compare", icon=":material/scatter_plot:"),
        st.Page("views/deploy.py", title="Deploy", icon=":material/rocket_launch:"),
        st.Page("views/runs.py", title="Runs", icon=":material/history:"),
    ])
    with st.sidebar:
        st.caption(f"Run store: `{Store().url}`")
        active_runs()
    try:
        page.run()
    finally:  # after the first page's script, which it would slow by about a second
        warm_up()
