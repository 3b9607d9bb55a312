"""What the showcase runs, as plain data: its base recipe, its compression steps and its
optimizer race (and the reduced versions the tests run). Nothing here imports torch, so
a page can name the race's entrants without loading the engine; `engine.showcase` turns
these into recipes, keys and runs.
"""

from __future__ import annotations

from typing import Any

# digits (8x8 images, 10 classes) and a 64-128-64-10 MLP: seconds per run on two cores
BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"source": "builtin:digits"},
    "model": {"source": "builtin:mlp", "hidden": [128, 64]},
    "train": {"optimizer": "adam", "lr": None, "epochs": 30},  # ~0.5 s of training
}
# one step per run: (label, step); fine-tuning epochs kept small, the accuracy holds
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("prune magnitude 80%", {"technique": "prune", "method": "magnitude", "amount": 0.8,
                             "finetune_epochs": 10}),
    ("quantize static int8", {"technique": "quantize", "method": "static_int8"}),
    ("distill to half width", {"technique": "distill", "width_multiplier": 0.5,
                               "epochs": 30}),
    ("low-rank SVD 25%", {"technique": "lowrank", "method": "svd", "rank_fraction": 0.25,
                          "finetune_epochs": 5}),
    ("Deep Compression", {"technique": "deep_compression", "prune_epochs": 20,
                          "share_epochs": 5}),
]
RACE = ["sgd", "momentum", "adam"]  # each at its own default learning rate
RACE_SCHEDULES = ["constant", "step", "cosine"]

# the reduced showcase for tests: iris, a tiny MLP, an epoch or two per stage
QUICK_BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"source": "builtin:iris"},
    "model": {"source": "builtin:mlp", "hidden": [16]},
    "train": {"optimizer": "adam", "lr": 0.01, "epochs": 5},
}
QUICK_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("prune magnitude 50%", {"technique": "prune", "amount": 0.5, "finetune_epochs": 1}),
    ("quantize static int8", {"technique": "quantize", "method": "static_int8",
                              "calibration_rows": 32}),
    ("distill to half width", {"technique": "distill", "epochs": 2}),
    ("low-rank SVD 50%", {"technique": "lowrank", "rank_fraction": 0.5,
                          "finetune_epochs": 1}),
    ("Deep Compression", {"technique": "deep_compression", "prune_epochs": 1,
                          "share_epochs": 1}),
]
QUICK_RACE = ["sgd", "adam"]
