"""Hyperparameter search: how many trials TPE and random search need, and what workers buy.

A fixed problem: an MLP on `digits` (15 epochs of Adam, no early stopping), searching
train.lr (log-uniform 1e-4..1e-1), train.weight_decay (log-uniform 1e-6..1e-1) and
model.hidden ([16], [64] or [256]). For each seed, each sampler runs a capped study and
we count the trials until the validation accuracy first reaches the target (cap + 1 when
it never does). Then the wall clock of one 16-trial random search with 1 and 2 worker
processes on the same SQLite storage.

    python tests/benchmarks/bench_tune.py [--seeds 5] [--cap 40] [--target 0.97]

Not a unit test: figures depend on the machine and go in the README by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.latency import machine
from engine.recipe import Recipe
from engine.runner import resolve
from engine.tune import search, validate_tune

SPACE = {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True},
         "train.weight_decay": {"low": 1e-6, "high": 1e-1, "log": True},
         "model.hidden": [[16], [64], [256]]}


def recipe_for(tune: dict) -> Recipe:
    recipe = resolve({"data": {"source": "builtin:digits"},
                               "model": {"source": "builtin:mlp", "hidden": [64]},
                               "train": {"optimizer": "adam", "epochs": 15,
                                         "early_stopping": None}})
    return recipe.replace(tune=validate_tune({"space": SPACE, **tune}))


def trials_to_target(sampler: str, seed: int, cap: int, target: float, url: str) -> int:
    result = search(recipe_for({"sampler": sampler, "n_trials": cap, "seed": seed,
                                "study": f"{sampler}-{seed}"}), storage=url)
    for i, t in enumerate(sorted(result["trials"], key=lambda t: t["number"])):
        if t["values"] and t["values"][0] >= target:
            return i + 1
    return cap + 1


def wall(workers: int, n: int, url: str) -> float:
    start = time.perf_counter()
    search(recipe_for({"sampler": "random", "n_trials": n, "seed": 0, "workers": workers,
                       "study": f"wall-{workers}"}), storage=url)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cap", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--wall-trials", type=int, default=16)
    args = parser.parse_args()
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        counts = {s: [trials_to_target(s, seed, args.cap, args.target, url)
                      for seed in range(args.seeds)] for s in ("tpe", "random")}
        print(f"\ntrials to first reach val accuracy >= {args.target} on digits "
              f"(cap {args.cap}; never = {args.cap + 1})")
        print(f"{'sampler':<8} {'mean':>6} {'std':>6}  per seed")
        for sampler, found in counts.items():
            print(f"{sampler:<8} {statistics.mean(found):>6.1f} {statistics.stdev(found):>6.1f}"
                  f"  {found}")
        one = wall(1, args.wall_trials, url)
        two = wall(2, args.wall_trials, url)
    print(f"\nwall clock of a {args.wall_trials}-trial random search")
    print(f"{'workers':<8} {'seconds':>8}")
    print(f"{1:<8} {one:>8.1f}\n{2:<8} {two:>8.1f}\nratio 1/2: {one / two:.2f}x")


if __name__ == "__main__":
    main()
