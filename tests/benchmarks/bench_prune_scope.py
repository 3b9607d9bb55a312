"""90% magnitude pruning of LeNet-300-100 on digits under each scope, over three seeds:
the accuracy lost after 10 and 20 fine-tuning epochs (issue 18's target: within 1 point).

    python tests/benchmarks/bench_prune_scope.py

Each row trains the seed's baseline (Adam at 1e-3, 40 epochs) and prunes it: `layer` (each
layer loses 90%), `global` (one magnitude threshold) and `lamp` (one threshold on
layer-adaptive scores, the default).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine

SCOPES = ("layer", "global", "lamp")
SEEDS = (0, 1, 2)


def main() -> None:
    print("| fine-tuning | scope | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |")
    print("|---|---|" + "---:|" * (len(SEEDS) + 1))
    for epochs in (10, 20):
        for scope in SCOPES:
            deltas = []
            for seed in SEEDS:
                base = {"seed": seed, "data": {"source": "builtin:digits"},
                        "model": {"source": "builtin:mlp", "hidden": [300, 100]},
                        "train": {"optimizer": "adam", "lr": 0.001, "epochs": 40,
                                  "early_stopping": None}}
                step = {"technique": "prune", "method": "magnitude", "amount": 0.9,
                        "scope": scope, "finetune_epochs": epochs}
                base_v, pruned = engine.run({**base, "compress": [step]})["variants"]
                deltas.append(100 * (pruned["metrics"]["test_accuracy"]
                                     - base_v["metrics"]["test_accuracy"]))
            print(f"| {epochs} | {scope} | " + " | ".join(f"{d:+.2f}" for d in deltas)
                  + f" | {statistics.mean(deltas):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
