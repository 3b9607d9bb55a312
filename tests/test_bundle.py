"""The model bundle: every variant a run writes reloads as the same module tree with the same
weights, a run's model compresses exactly like the in-memory one, and a bad bundle is one
sentence."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import engine
from engine.bundle import is_bundle, load_bundle, read_meta, save_bundle
from engine.data import load_data
from engine.errors import UserError
from engine.models import build_model
from engine.recipe import DataConfig, ModelConfig

DIGITS = {"source": "builtin:digits"}
CHAINS = {
    "structural": [{"technique": "prune", "method": "structured", "amount": 0.5,
                    "finetune_epochs": 1},
                   {"technique": "lowrank", "rank_fraction": 0.5, "finetune_epochs": 1},
                   {"technique": "share", "bits": 4, "finetune_epochs": 1},
                   {"technique": "quantize", "method": "qat", "bits": 6, "finetune_epochs": 1}],
    "values": [{"technique": "prune", "method": "obd", "amount": 0.5, "finetune_epochs": 1},
               {"technique": "quantize", "method": "uniform", "bits": 4},
               {"technique": "quantize", "method": "fp16"},
               {"technique": "distill", "width_multiplier": 0.5, "epochs": 2}],
}


def _inputs(data_cfg: dict, n: int = 16) -> torch.Tensor:
    data = load_data(DataConfig(**data_cfg), seed=0)
    return torch.as_tensor(data.X_test[:n])


def _same_model(folder, x: torch.Tensor) -> None:
    """The bundle gives back the module tree and the outputs of the model the run held
    (its .pt2 export was written from that in-memory model)."""
    reloaded = load_bundle(folder)
    exported = torch.export.load(str(folder / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), exported(x), rtol=0, atol=1e-6)
    names = {k for k in reloaded.state_dict() if not k.startswith("preprocess.")}
    assert names == set(exported.state_dict())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_every_builtin_round_trips_after_every_technique(tmp_path, arch, chain):
    result = engine.run({"data": DIGITS, "model": {"source": f"builtin:{arch}", "hidden": [32],
                                                   "channels": [8]},
                         "train": {"epochs": 2}, "compress": CHAINS[chain]}, out_dir=tmp_path)
    x = _inputs(DIGITS)
    assert len(result["variants"]) == 1 + len(CHAINS[chain])
    for v in result["variants"]:
        assert is_bundle(tmp_path / v["model_file"])
        _same_model(tmp_path / v["model_file"], x)
        meta = read_meta(tmp_path / v["model_file"])
        assert meta["output"] == {"task": "classification", "n_out": 10,
                                  "classes": [str(i) for i in range(10)]}
        assert meta["input"]["shape"] == [1, 8, 8]
        assert meta["compression"] == ([] if v["name"] == "baseline"
                                       else v["metrics"]["chain"].split(" -> "))
    if chain == "structural":  # what the overrides had to say: a factorized, pruned model
        meta = read_meta(tmp_path / result["variants"][2]["model_file"])
        kinds = json.dumps(meta["overrides"])
        assert "Factorized" in kinds
        shared = read_meta(tmp_path / result["variants"][3]["model_file"])["layers"]
        assert all(row["distinct_values"] <= 16 for row in shared if "weight" in row["tensor"])


def test_compressing_a_runs_model_equals_compressing_the_fresh_one(tmp_path):
    """Train, then Compress "a finished run's model": the same numbers as the chain run on
    the in-memory model (to 1e-6), sharing included (it once skipped a reloaded graph)."""
    train = {"epochs": 3}
    chain = [{"technique": "prune", "method": "magnitude", "amount": 0.6, "finetune_epochs": 1},
             {"technique": "share", "bits": 4, "finetune_epochs": 1},
             {"technique": "lowrank", "rank_fraction": 0.5, "finetune_epochs": 0}]
    model = {"source": "builtin:mlp", "hidden": [32]}
    fresh = engine.run({"data": DIGITS, "model": model, "train": train, "compress": chain},
                       out_dir=tmp_path / "fresh")
    trained = engine.run({"data": DIGITS, "model": model, "train": train},
                         out_dir=tmp_path / "trained")
    source = str(tmp_path / "trained" / trained["variants"][0]["model_file"])
    again = engine.run({"data": DIGITS, "model": {**model, "source": source},
                        "train": {**train, "epochs": 0}, "compress": chain},
                       out_dir=tmp_path / "again")
    assert [v["name"] for v in again["variants"]] == [v["name"] for v in fresh["variants"]]
    for a, b in zip(fresh["variants"], again["variants"], strict=True):
        for key in ("test_accuracy", "test_loss", "nonzero_params", "size_bytes"):
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-6), (a["name"],
                                                                                      key)
    x = _inputs(DIGITS)
    for a in fresh["variants"]:
        torch.testing.assert_close(load_bundle(tmp_path / "fresh" / a["model_file"])(x),
                                   load_bundle(tmp_path / "again" / a["model_file"])(x),
                                   rtol=0, atol=1e-6)
    share_notes = " ".join(again["variants"][2]["metrics"]["notes"])
    assert "clusters" in share_notes and "No Linear or Conv" not in share_notes


def test_a_bundle_is_a_model_source_with_its_own_shapes(tmp_path):
    engine.run({"data": DIGITS, "model": {"source": "builtin:mlp", "hidden": [16]},
                "train": {"epochs": 1}}, out_dir=tmp_path)
    model = build_model(ModelConfig(source=str(tmp_path / "baseline")), (1, 8, 8), 10, seed=3)
    assert [n for n, _ in model.named_children()] == ["flatten", "fc1", "act1", "out"]
    with pytest.raises(UserError, match=r"\(13,\)"):  # wine's 13 features do not fit it
        build_model(ModelConfig(source=str(tmp_path / "baseline")), (13,), 3, seed=0)


def test_bad_bundles_are_one_sentence(tmp_path):
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)
    save_bundle(model, tmp_path / "b", input_spec={}, output_spec={})
    folder = tmp_path / "b"
    # weights that do not match the architecture: first missing and unexpected, with shapes
    other = build_model(ModelConfig(source="builtin:mlp", hidden=(6,)), (4,), 3, seed=0)
    save_bundle(other, tmp_path / "o", input_spec={}, output_spec={})
    (tmp_path / "o" / "model.json").write_text((folder / "model.json").read_text())
    with pytest.raises(UserError, match=r"fc1.weight is \[6, 4\] where the architecture has "
                                        r"\[8, 4\]"):
        load_bundle(tmp_path / "o")
    # a safetensors header that lies about its size
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[:8] = struct.pack("<Q", len(blob) * 10)
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_bundle(folder)
    # a model.json that is not ours, and a builder we do not know
    (folder / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a workbench model bundle"):
        load_bundle(folder)
    (folder / "model.json").write_text(json.dumps({"format": "workbench-bundle",
                                                   "builder": {"kind": "pickle"}}))
    save_bundle(model, tmp_path / "c", input_spec={}, output_spec={})
    (tmp_path / "c" / "model.json").write_text((folder / "model.json").read_text())
    with pytest.raises(UserError, match="builder 'pickle'"):
        load_bundle(tmp_path / "c")


def test_a_module_a_bundle_cannot_describe_is_refused_by_name(tmp_path):
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)

    class Odd(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model.act1 = Odd()
    with pytest.raises(UserError, match="layer act1 is a Odd"):
        save_bundle(model, tmp_path / "b", input_spec={}, output_spec={})
