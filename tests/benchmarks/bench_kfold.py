"""A k-fold search with its folds trained as one batched ensemble, and fold by fold.

6 random-search trials of the digits MLP (hidden [64], Adam, 15 epochs, no early stopping,
lr log-uniform 1e-4..0.1), 5-fold validation, one torch thread; the sequential figure
switches batching off (`engine.ensemble.blocker`). Median of 3 after one untimed search.

    python tests/benchmarks/bench_kfold.py

Not a unit test: figures depend on the machine and go in the README by hand.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

import engine.ensemble as ensemble
from engine.latency import machine
from engine.runner import resolve
from engine.tune import search, validate_tune

BATCHABLE = ensemble.blocker


def timed(study: str, batched: bool, url: str) -> tuple[float, float]:
    ensemble.blocker = BATCHABLE if batched else (lambda recipe: "switched off")
    recipe = resolve({
        "data": {"source": "builtin:digits"}, "model": {"hidden": [64]},
        "train": {"optimizer": "adam", "epochs": 15, "early_stopping": None}}).replace(
        tune=validate_tune({"sampler": "random", "n_trials": 6, "seed": 0, "study": study,
                            "validation": "kfold", "folds": 5,
                            "space": {"train.lr": {"low": 1e-4, "high": 0.1, "log": True}}}))
    start = time.perf_counter()
    result = search(recipe, storage=url)
    return (time.perf_counter() - start,
            statistics.mean(t["values"][0] for t in result["trials"]))


def main() -> None:
    torch.set_num_threads(1)
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        timed("warm", True, url)
        runs = {kind: [timed(f"{kind}-{i}", kind == "batched", url) for i in range(3)]
                for kind in ("batched", "fold by fold")}
    print(f"\n{'folds trained':<14} {'seconds':>8} {'mean val acc':>13}")
    for kind, out in runs.items():
        print(f"{kind:<14} {statistics.median(s for s, _ in out):>8.2f} {out[0][1]:>13.3f}")


if __name__ == "__main__":
    main()
