"""OBD and OBS against magnitude and random pruning on the digits MLP (64-256-128-10, 15 epochs of
Adam), at 50% and 90%, per layer and under one global threshold (the default), with and
without 10 epochs of fine-tuning: the change in test accuracy, in points.

    python tests/benchmarks/bench_obd.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.compress import COMPRESSORS
from tests.helpers import trained_context

CRITERIA = [("magnitude", {}), ("random", {}), ("obd", {"curvature": "hessian"}),
            ("obd", {"curvature": "fisher"}), ("obs", {}),
            ("magnitude", {"reconstruct": "obs"})]


def main() -> None:
    model, ctx = trained_context({"data": {"source": "builtin:digits"},
                                  "model": {"source": "builtin:mlp", "hidden": [256, 128]},
                                  "train": {"epochs": 15, "early_stopping": None}})
    base = ctx.evaluate(model)["accuracy"]
    prune = COMPRESSORS.get("prune")
    print(f"baseline test accuracy {base:.4f}\n")
    print("| scope | pruned | fine-tuning | " + " | ".join(
        m + "".join(f" ({v})" if k == "curvature" else " + OBS reconstruction"
                    for k, v in o.items()) for m, o in CRITERIA) + " |")
    print("|---|---|---:|" + "---:|" * len(CRITERIA))
    for scope in ("layer", "global"):
        for amount in (0.5, 0.9):
            for epochs in (0, 10):
                cells = []
                for method, options in CRITERIA:
                    start = time.perf_counter()
                    step = prune.resolve({"method": method, "amount": amount, "scope": scope,
                                          "finetune_epochs": epochs, **options}, "compress[0]")
                    acc = ctx.evaluate(prune.fn(model, step, ctx).model)["accuracy"]
                    cells.append(f"{100 * (acc - base):+.1f} "
                                 f"({time.perf_counter() - start:.1f} s)")
                print(f"| {scope} | {amount:.0%} | {epochs} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
