"""One test over the whole compression registry, and the chain as the runner runs it."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.bundle import is_bundle
from engine.compress import COMPRESSORS, load_all
from engine.compress.encode import encode
from engine.runner import resolve
from tests.helpers import trained_context

load_all()
FAST = {"finetune_epochs": 1, "epochs": 5, "prune_epochs": 3, "share_epochs": 1}


@pytest.fixture(scope="module")
def trained():
    return trained_context({"data": {"source": "builtin:digits"},
                            "model": {"source": "builtin:mlp", "hidden": [64, 32]},
                            "train": {"epochs": 5, "early_stopping": None}})


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_every_technique_copies_evaluates_and_really_shrinks(name, trained):
    model, ctx = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entry = COMPRESSORS.get(name)
    options = {k: v for k, v in FAST.items() if any(p.name == k for p in entry.params)}
    result = entry.fn(model, entry.resolve(options, "compress[0]"), ctx)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input was changed"
    baseline_size = len(encode(model))
    if result.runtime == "torch":
        assert result.model is not model
        scores = {"test_accuracy": ctx.evaluate(result.model)["accuracy"]}
        size = len(encode(result.model, huffman=result.huffman))
    else:
        scores = result.metrics
        size = len(result.onnx_bytes)
    assert scores["test_accuracy"] > 0.2, scores  # above chance (0.1) after brief tuning
    assert size < baseline_size, f"{name} claims compression but ships {size} bytes"


def test_a_chain_yields_one_variant_per_step_in_order(tmp_path):
    result = engine.run({"data": {"source": "builtin:iris"},
                         "model": {"source": "builtin:mlp", "hidden": [16]},
                         "train": {"epochs": 30, "lr": 0.01},
                         "compress": [{"technique": "prune", "amount": 0.5,
                                       "finetune_epochs": 2},
                                      {"technique": "share", "bits": 3, "finetune_epochs": 1},
                                      {"technique": "prune", "amount": 0.7,
                                       "finetune_epochs": 1}],
                         "sensitivity": {"amounts": [0.5], "bits": [4], "ranks": [0.5]}},
                        out_dir=tmp_path)
    variants = result["variants"]
    assert [v["name"] for v in variants] == ["baseline", "prune-magnitude", "share",
                                              "prune-magnitude-2"]
    assert variants[3]["metrics"]["chain"].count("->") == 2
    sizes = [v["metrics"]["size_bytes"] for v in variants]
    assert sizes[0] > sizes[1] > sizes[2]
    for v in variants:
        assert (tmp_path / v["name"] / "model.wbz").stat().st_size == v["metrics"]["size_bytes"]
        assert v["model_file"] == v["name"] and is_bundle(tmp_path / v["model_file"])
    # the pruned-but-dense variant is smaller, and the runner says whether it is faster
    assert variants[1]["metrics"]["size_ratio"] > 1.2
    assert "speedup" in variants[1]["metrics"]
    sens = result["sensitivity"]
    assert {r["technique"] for r in sens["records"]} == {"prune", "quantize", "lowrank"}
    assert {r["layer"] for r in sens["records"]} == {"fc1", "out"}


def test_onnx_runtime_steps_must_come_last():
    with pytest.raises(engine.UserError, match="last in the chain"):
        resolve({"compress": [{"technique": "quantize", "method": "static_int8"},
                                       {"technique": "prune"}]})


def test_every_latency_is_one_measurement_and_every_speedup_divides_two_shown_figures():
    events = []
    result = engine.run({"data": {"source": "builtin:iris"},
                         "model": {"source": "builtin:mlp", "hidden": [16]},
                         "train": {"epochs": 5},
                         "compress": [{"technique": "prune", "amount": 0.5,
                                       "finetune_epochs": 0},
                                      {"technique": "quantize", "method": "static_int8"}]},
                        on_progress=events.append)
    variants = result["variants"]
    base = variants[0]["metrics"]["latency_ms"]
    for v in variants:
        m = v["metrics"]
        assert m["latency_threads"] == 1 and m["latency_calls"] >= 700
        if v["name"] != "baseline":
            assert m["speedup"] == pytest.approx(base / m["latency_ms"], rel=1e-12)
            assert m["speedup_reference"] == "the baseline, PyTorch eager, 1 thread"
    assert variants[2]["metrics"]["speedup_vs_onnx_fp32"] > 0  # int8 beside its float32 file
    # the int8 file is made from the pruned model: its non-zero weights are the pruned one's
    # (they were the baseline's, so Compress listed int8 with twice the pruned model's count)
    pruned, int8 = variants[1]["metrics"], variants[2]["metrics"]
    assert int8["nonzero_params"] == pruned["nonzero_params"] < 0.6 * variants[0]["metrics"][
        "nonzero_params"]
    assert int8["params"] == pruned["params"] and int8["flops"] == pruned["flops"]
    final = {}  # the last event of each variant is what the store keeps: with its latency
    for e in events:
        if e["event"] == "variant":
            final[e["name"]] = e["metrics"]
    assert {n: m["latency_ms"] for n, m in final.items()} == {
        v["name"]: v["metrics"]["latency_ms"] for v in variants}
