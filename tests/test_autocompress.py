"""Auto-compress: the budget held on held-out rows, the front, resuming, mixed precision."""

from __future__ import annotations

import json

import pytest
import torch

import engine
from engine.autocompress import allocate_bits, pareto_front, validate_autocompress
from engine.compress import COMPRESSORS
from engine.errors import UserError
from engine.runner import resolve

BASE = {"seed": 0, "data": {"source": "builtin:digits"},
        "model": {"source": "builtin:mlp", "hidden": [64, 32]},
        "train": {"optimizer": "adam", "lr": 0.003, "epochs": 12, "early_stopping": None}}


def run(tmp_path, auto: dict, **kwargs) -> dict:
    return engine.run({**BASE, "autocompress": {"max_epochs": 4, **auto}},
                      storage=f"sqlite:///{tmp_path}/s.db", **kwargs)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("auto")
    return run(folder, {"budget": {"max_drop": 0.02}, "trials": 10}, out_dir=folder / "run")


@pytest.mark.slow
def test_the_recommended_variant_meets_the_budget_on_held_out_rows(searched):
    auto = searched["autocompress"]
    base, found = searched["variants"][0], searched["variants"][-1]
    assert auto["recommended"] == found["name"] == "autocompress"
    # the harness's own figures for the variant, on the validation rows it was chosen on
    # (never trained on: fine-tuning uses the training part only)
    drop = base["metrics"]["val_accuracy"] - found["metrics"]["val_accuracy"]
    assert drop <= 0.02 + 1e-9
    chosen = next(t for t in auto["trials"] if t["number"] == auto["chosen_trial"])
    assert chosen["meets_budget"]
    assert found["metrics"]["size_bytes"] == chosen["metrics"]["size_bytes"]  # one model
    assert found["metrics"]["size_bytes"] < base["metrics"]["size_bytes"] / 4
    # the least cost among the trials that met the budget
    feasible = [t["metrics"]["size_bytes"] for t in auto["trials"] if t.get("meets_budget")]
    assert chosen["metrics"]["size_bytes"] == min(feasible)
    words = " ".join(auto["explanation"]["words"])
    assert f"{found['metrics']['size_bytes']:,} bytes" in words
    assert [r["layer"] for r in auto["explanation"]["layers"]] == ["fc1", "fc2", "out"]


def test_the_front_is_non_dominated_and_covers_every_trial(searched):
    auto = searched["autocompress"]
    done = [t for t in auto["trials"] if t["state"] == "COMPLETE"]
    front = auto["front"]
    assert front and len(done) == 10

    def point(t):
        return t["metrics"]["drop"], t["metrics"]["size_bytes"]

    def dominates(a, b):
        return point(a)[0] <= point(b)[0] and point(a)[1] <= point(b)[1] and point(a) != point(b)

    for a in front:
        assert not any(dominates(b, a) for b in done)
    for t in done:  # every trial off the front is beaten by one on it
        if t not in front:
            assert any(dominates(f, t) or point(f) == point(t) for f in front)
    assert pareto_front(done, "size") == front


def test_the_search_leaves_a_recipe_that_replays_the_chain(searched, tmp_path):
    replay = searched["autocompress"]["recipe"]
    assert replay["autocompress"] is None and replay["compress"]
    again = engine.run(replay)
    assert (again["variants"][-1]["metrics"]["size_bytes"]
            == searched["variants"][-1]["metrics"]["size_bytes"])
    json.dumps(searched["autocompress"])  # the section is plain JSON


@pytest.mark.slow
def test_a_resumed_search_continues_its_study(tmp_path):
    first = run(tmp_path, {"budget": {"max_drop": 0.05}, "trials": 3, "study": "resume-me"})
    second = run(tmp_path, {"budget": {"max_drop": 0.05}, "trials": 5, "study": "resume-me"})
    numbers = [t["number"] for t in second["autocompress"]["trials"]]
    assert numbers == [0, 1, 2, 3, 4]
    assert ([t["chain"] for t in second["autocompress"]["trials"][:3]]
            == [t["chain"] for t in first["autocompress"]["trials"]])
    other = {**BASE, "train": {**BASE["train"], "epochs": 3}}
    with pytest.raises(UserError, match="another baseline"):
        engine.run({**other, "autocompress": {"trials": 4, "study": "resume-me"}},
                   storage=f"sqlite:///{tmp_path}/s.db")


def test_mixed_precision_gives_sensitive_layers_more_bits():
    drops = {"robust": {2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0, 8: 0.0},
             "touchy": {2: 0.30, 3: 0.08, 4: 0.02, 5: 0.004, 6: 0.0, 8: 0.0}}
    assert allocate_bits(drops, floor=2, tolerance=0.005) == {"robust": 2, "touchy": 5}
    assert allocate_bits(drops, floor=3, tolerance=0.05) == {"robust": 3, "touchy": 4}
    never = {"hopeless": {b: 0.5 for b in (2, 3, 4, 5, 6, 8)}}
    assert allocate_bits(never, floor=2, tolerance=0.01) == {"hopeless": 8}


def test_share_and_quantize_take_per_layer_widths():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    from engine.compress.base import layer_widths

    step = {"bits": 5, "layer_bits": {"2": 2}}
    assert layer_widths(model, step, low=1) == {"0": 5, "2": 2}
    with pytest.raises(UserError, match="not a layer"):
        layer_widths(model, {"bits": 5, "layer_bits": {"fc9": 2}}, low=1)
    with pytest.raises(UserError, match="whole number from 2 to 8"):
        layer_widths(model, {"bits": 5, "layer_bits": {"0": 1}}, low=2)
    assert "layer_bits" in {p.name for p in COMPRESSORS.get("share").params}
    assert "layer_bits" in {p.name for p in COMPRESSORS.get("quantize").params}


def test_a_real_search_gives_layers_of_different_sensitivity_different_widths(tmp_path):
    """On a trained model, the searched share steps with mixed precision give each layer
    the width its measured sensitivity asks for: the distinct values per layer follow."""
    result = run(tmp_path, {"budget": {"max_drop": 0.05}, "trials": 6,
                            "techniques": ["share"]})
    drops = {k: {int(b): d for b, d in v.items()}
             for k, v in result["autocompress"]["sensitivity"].items()}
    assert set(drops) == {"fc1", "fc2", "out"}
    mixed = [t for t in result["autocompress"]["trials"]
             if t["state"] == "COMPLETE" and t["chain"] and t["chain"][-1].get("layer_bits")]
    assert mixed  # the layers of this model differ enough that some trial mixes widths
    for t in mixed:
        step = t["chain"][-1]
        widths = {k: step["layer_bits"].get(k, step["bits"]) for k in drops}
        # a layer given more bits than another was measured more sensitive at the fewer
        for a in drops:
            for b in drops:
                if widths[a] > widths[b]:
                    assert drops[a][widths[b]] > drops[b][widths[b]]


def test_nothing_within_the_budget_says_how_close_it_came(tmp_path):
    result = run(tmp_path, {"budget": {"max_drop": 0.0, "max_size_bytes": 50},
                            "trials": 3})
    auto = result["autocompress"]
    assert auto["recommended"] is None
    assert [v["name"] for v in result["variants"]] == ["baseline"]
    assert auto["message"].startswith("No chain met the budget (at most 0 points lost with a "
                                      "margin of 1 standard error, at most 50 bytes) in 3 "
                                      "trials; the closest, trial")


@pytest.mark.parametrize("section, words", [
    ({"budget": {"max_drop": 2}}, "is a fraction"),
    ({"budget": {}}, "must give one or more of"),
    ({"objective": "speed"}, "must be size or latency"),
    ({"techniques": ["prune", "magic"]}, "must be a list drawn from"),
    ({"trials": 0}, "trials must be a whole number"),
    ({"budgte": {}}, "has no key 'budgte'"),
])
def test_a_wrong_section_is_one_sentence(section, words):
    with pytest.raises(UserError, match=words):
        resolve({**BASE, "autocompress": section})
    filled = validate_autocompress({"budget": {"max_drop": 0.01}})
    assert validate_autocompress(filled) == filled  # idempotent


@pytest.mark.slow
def test_workers_share_one_study_and_the_winner_is_rebuilt_from_its_chain(tmp_path):
    """Two spawned workers run the trials against the study in the store's database; the
    winner, found in another process, is rebuilt here from its chain and measured."""
    result = run(tmp_path, {"budget": {"max_drop": 0.05}, "trials": 4, "workers": 2})
    auto = result["autocompress"]
    assert sorted(t["number"] for t in auto["trials"]) == [0, 1, 2, 3]
    assert auto["recommended"] == "autocompress"
    base, found = result["variants"][0]["metrics"], result["variants"][-1]["metrics"]
    chosen = next(t for t in auto["trials"] if t["number"] == auto["chosen_trial"])
    assert chosen["meets_budget"]
    assert base["val_accuracy"] - found["val_accuracy"] <= 0.05 + 0.01  # rebuilt: ±1 row


def test_confidence_asks_for_a_margin_of_standard_errors():
    import numpy as np

    from engine.autocompress.search import drop_error, violations

    metrics = {"drop": 0.005, "drop_se": 0.004, "size_bytes": 100}
    assert violations(metrics, {"max_drop": 0.01}) == {"max_drop": pytest.approx(-0.005)}
    assert violations(metrics, {"max_drop": 0.01}, 1.0)["max_drop"] == pytest.approx(-0.001)
    assert violations(metrics, {"max_drop": 0.01}, 2.0)["max_drop"] > 0
    base = np.array([True] * 90 + [False] * 10)
    now = base.copy()
    now[:4] = False  # four rows lost, one gained: a paired difference of 3 rows in 100
    now[95] = True
    assert drop_error(base, now) == pytest.approx(np.sqrt(5 - 9 / 100) / 100)
    assert drop_error(None, now) is None
