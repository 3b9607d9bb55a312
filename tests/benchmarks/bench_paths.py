"""The Showcase, a default Diagnose and a 16-trial search, timed through the jobs API, each
run in its own worker as the app starts them: forked from the worker zygote, which the
app's warm-up has started by the time a person presses (`--no-zygote`: every worker a
fresh process, as before the zygote); the README quotes them. Run it on a quiet machine:

    python tests/benchmarks/bench_paths.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import jobs, local_backend, showcase
from engine.store import Store

SEARCH = {"data": {"source": "builtin:digits"}, "train": {"epochs": 15},
          "tune": {"sampler": "random", "n_trials": 16,
                   "space": {"train.lr": {"low": 1e-4, "high": 0.1, "log": True},
                             "model.hidden": [[16], [64], [256]]}}}
DIAGNOSE = {"data": {"source": "builtin:digits"}, "diagnose": {}}


def timed(store: Store, label: str, run_ids: list[str], start: float) -> None:
    runs = jobs.wait(run_ids, store=store)
    done = sum(r["status"] == "done" for r in runs)
    print(f"{label}: {done} of {len(runs)} run(s) done in {time.perf_counter() - start:.1f} s")


def main() -> None:
    if "--no-zygote" in sys.argv:
        os.environ[local_backend.ZYGOTE_ENV] = "/nonexistent"
    else:  # as the app's warm-up does before a person presses
        local_backend.start_zygote()
        while local_backend._zygote_socket() is None:
            time.sleep(0.2)
    root = tempfile.mkdtemp()
    store = Store(f"sqlite:///{root}/store.db", artifacts=f"{root}/artifacts")
    start = time.perf_counter()
    timed(store, "showcase", showcase.launch(store).run_ids, start)
    start = time.perf_counter()
    timed(store, "default diagnose", [jobs.submit(DIAGNOSE, store=store)], start)
    start = time.perf_counter()
    timed(store, "16-trial search", [jobs.submit(SEARCH, store=store)], start)


if __name__ == "__main__":
    main()
