"""The workbench's entry point: the page list and the sidebar, nothing else.

    streamlit run app.py
"""

import threading

import streamlit as st

from engine.progress import progress_of
from engine.store import Store
from views.workspace import restore_workspace, save_workspace, session_owner

st.set_page_config(page_title="Model optimization workbench", page_icon=":material/speed:",
                   layout="wide")


@st.cache_resource
def warm_up() -> threading.Thread:
    """Import torch, scikit-learn and the engine in the background while the first page
    shows (about 3 s on two cores), so neither the first render nor the first visit to a
    page that needs them pays for it; then mark runs whose worker died while the app was
    down as failed."""
    def work() -> None:
        import torch

        from engine import jobs
        from engine.models import complexity

        complexity(torch.nn.Linear(2, 2), (2,))  # its FLOP counter loads torch._dynamo
        jobs.reap(Store())
        # transformers' lazy classes, imported here once: in the browser test, a page's
        # first import of them (seconds long) failed once in three with "cannot import
        # name 'AutoTokenizer'", then for the life of the server (README, Text models)
        from transformers import (  # noqa: F401
            AutoConfig,
            AutoModel,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

    thread = threading.Thread(target=work, name="workbench-warm-up", daemon=True)
    thread.start()
    return thread


def device_name() -> str:
    """The training device, once the warm-up has imported torch (never blocks a render)."""
    return "detecting..." if warm_up().is_alive() else _device_name()


@st.cache_resource
def _device_name() -> str:
    import torch

    from engine.train import resolve_device

    device = resolve_device("auto")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


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
    warm_up()
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
    page.run()
