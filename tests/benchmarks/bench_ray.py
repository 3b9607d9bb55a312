"""A 16-trial search on a local Ray instance with 1 and 2 trial tasks, wall clock.

The same digits problem as bench_tune.py (15 epochs of Adam per trial), the study in one
SQLite store, trials as Ray tasks (WORKBENCH_BACKEND=ray). Ray is started once, before
timing, with as many CPUs as the machine has; each trial task takes one CPU and one
torch thread.

    python tests/benchmarks/bench_ray.py [--trials 16] [--repeats 2]

Not a unit test: figures depend on the machine and go in the README by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from bench_tune import recipe_for  # noqa: E402

from engine.latency import machine  # noqa: E402
from engine.tune import search  # noqa: E402


def wall(workers: int, n: int, url: str, repeat: int) -> float:
    start = time.perf_counter()
    search(recipe_for({"sampler": "random", "n_trials": n, "seed": repeat,
                       "workers": workers, "study": f"ray-{workers}-{repeat}"}), storage=url)
    return time.perf_counter() - start


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ["WORKBENCH_BACKEND"] = "ray"
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print("machine:", machine(), f"· Ray {ray.__version__} with {cpus} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        wall(2, 4, url, 99)  # both Ray worker processes import torch once, untimed
        times = {w: [wall(w, args.trials, url, r) for r in range(args.repeats)]
                 for w in (1, 2)}
    one, two = (statistics.median(times[w]) for w in (1, 2))
    print(f"\nwall clock of a {args.trials}-trial random search, trials as Ray tasks "
          f"(median of {args.repeats})")
    print(f"{'tasks':<6} {'seconds':>8}")
    print(f"{1:<6} {one:>8.1f}\n{2:<6} {two:>8.1f}\nratio 1/2: {one / two:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
