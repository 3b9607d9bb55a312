"""The Showcase, a default Diagnose and a 16-trial search, timed through the jobs API, each
run in its own worker process as the app starts them; the README quotes them. Run it on a
quiet machine:

    python tests/benchmarks/bench_paths.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import jobs, showcase
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
