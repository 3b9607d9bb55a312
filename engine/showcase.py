"""The showcase: one press trains a baseline, runs the main techniques and an optimizer race.

Every showcase run is an ordinary recipe submitted through `engine.jobs.submit`, in the
group `showcase`, named `showcase · LABEL [KEY]`, where KEY is a hash of the recipe with
every default filled in. A second press finds the runs by that key and submits only the
recipes that have no finished (done) or active (queued, running) run yet, so it reuses
what is there and repairs what failed or was cancelled.

    launch = showcase.launch(store)            # returns at once; workers do the work
    launch.run_ids                             # one run per recipe, in showcase order
    launch.submitted                           # the ones this press started

Each compression run trains the same seeded baseline again (a second or two on digits)
rather than waiting for the baseline run's model: the runs start together, and none
depends on another finishing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import threading
from typing import Any

from engine import jobs
from engine.optimizers import OPTIMIZERS
from engine.recipe import Recipe
from engine.runner import resolve
from engine.store import ACTIVE, Store

GROUP = "showcase"
PREFIX = "showcase · "
_KEY = re.compile(r" \[([0-9a-f]{10})\]$")
_LAUNCH_LOCK = threading.Lock()  # two sessions pressing at once submit each recipe once

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


def race_entrant(train: dict[str, Any], vary: str, choice: str) -> dict[str, Any]:
    """The training section of one entrant in a race that varies `vary` ("optimizer" or
    "schedule"): a schedule from the same learning rate, or an optimizer at its own default
    rate and options (full batch for one that needs a closure)."""
    if vary == "schedule":
        return dict(train, schedule={"name": choice})
    closure = OPTIMIZERS.get(choice).extra.get("closure")
    return dict(train, optimizer=choice, lr=None, optimizer_options={},
                batch_size="full" if closure else train["batch_size"])

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


@dataclasses.dataclass(frozen=True)
class Entry:
    """One showcase run: what it shows (`label`), its recipe and the recipe's key."""

    label: str
    kind: str  # "baseline", "race" or "compress"
    recipe: dict[str, Any]
    key: str

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.label} · {Recipe.from_dict(self.recipe).title()} [{self.key}]"


@dataclasses.dataclass(frozen=True)
class Launch:
    """What a press did: every showcase run id in showcase order, and which were new."""

    run_ids: list[str]
    submitted: list[str]

    @property
    def reused(self) -> list[str]:
        return [i for i in self.run_ids if i not in self.submitted]


def recipe_key(recipe: dict[str, Any] | Recipe) -> str:
    """A stable 10-hex-digit hash of the recipe with every default filled in (name left
    out), so the same settings written two ways get the same key."""
    full = resolve(recipe).to_dict()
    full.pop("name", None)
    text = json.dumps(full, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def recipes(*, quick: bool = False) -> list[Entry]:
    """The showcase's runs in order: the baseline (Adam, which is also the race's Adam),
    the other optimizers of the race, then one run per compression technique."""
    base = QUICK_BASE if quick else BASE
    entries = []

    def add(label: str, kind: str, raw: dict[str, Any]) -> None:
        entries.append(Entry(label, kind, raw, recipe_key(raw)))

    add("baseline (adam)", "baseline", copy.deepcopy(base))
    for optimizer in QUICK_RACE if quick else RACE:
        if optimizer == base["train"]["optimizer"]:
            continue  # the baseline runs it
        raw = copy.deepcopy(base)
        raw["train"].update(optimizer=optimizer, lr=None)  # its own default rate
        add(f"race: {optimizer}", "race", raw)
    for label, step in QUICK_STEPS if quick else STEPS:
        add(label, "compress", {**copy.deepcopy(base), "compress": [dict(step)]})
    return entries


def key_of(name: str | None) -> str | None:
    """The recipe key at the end of a showcase run's name, or None."""
    match = _KEY.search(name or "")
    return match.group(1) if match else None


def display_name(name: str | None) -> str:
    """A run's name without the showcase prefix and key: `prune magnitude 80%`."""
    name = name or ""
    if key_of(name) is None:
        return name
    return _KEY.sub("", name).removeprefix(PREFIX)


def existing(store: Store) -> dict[str, dict[str, Any]]:
    """The run to reuse for each key: the newest done run, else the newest active one.
    Failed and cancelled runs are never reused."""
    found: dict[str, dict[str, Any]] = {}
    for run in store.list_runs(group=GROUP, limit=10_000):  # newest first
        key = key_of(run["name"])
        if key is None or run["status"] not in ("done", *ACTIVE):
            continue
        if key not in found or (run["status"] == "done" != found[key]["status"]):
            found[key] = run
    return found


def launch(store: Store | None = None, *, quick: bool = False,
           threads: int | None = 1) -> Launch:
    """Submit every showcase recipe that has no done or active run yet; return at once.

    `threads=1` per worker: several runs share the machine, and one thread each keeps
    them from fighting over the cores."""
    store = store or Store()
    jobs.reap(store)  # a run whose worker died must not count as active
    with _LAUNCH_LOCK:
        found = existing(store)
        run_ids, submitted = [], []
        for entry in recipes(quick=quick):
            if entry.key in found:
                run_ids.append(found[entry.key]["id"])
                continue
            run_id = jobs.submit(entry.recipe, store=store, name=entry.name, group=GROUP,
                                 threads=threads)
            run_ids.append(run_id)
            submitted.append(run_id)
    return Launch(run_ids=run_ids, submitted=submitted)


def progress(store: Store, run_ids: list[str]) -> dict[str, int]:
    """How many of the runs are done, active, and failed or cancelled."""
    counts = {"done": 0, "active": 0, "failed": 0}
    for run_id in run_ids:
        run = store.get_run(run_id)
        status = run["status"] if run else "failed"
        counts["done" if status == "done" else "active" if status in ACTIVE else "failed"] += 1
    return counts
