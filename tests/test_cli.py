"""`python -m engine`: run writes the result contract, list prints every registry, errors
are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.bundle import is_bundle, load_bundle
from engine.cli import main

ROOT = Path(__file__).parent.parent


def test_run_writes_result_and_model(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"data": {"source": "builtin:iris"},
                                  "model": {"source": "builtin:mlp", "hidden": [16]},
                                  "train": {"epochs": 4}}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["recipe"]["train"]["optimizer"] == "adam"  # defaults filled in
    assert result["device"] == "cpu"
    [variant] = result["variants"]
    assert variant["name"] == "baseline"
    for key in ("test_accuracy", "test_loss", "params", "nonzero_params", "size_bytes",
                "latency_ms", "flops"):
        assert key in variant["metrics"]
    assert variant["history"]["epoch"] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "time_s"):
        assert len(variant["history"][key]) == 4
    # the variant's folder: its bundle (what the engine reloads), the compressed encoding
    # whose size is size_bytes, and the .pt2 export; all three give the same model
    folder = tmp_path / "out" / variant["model_file"]
    assert variant["model_file"] == "baseline" and is_bundle(folder)
    assert variant["metrics"]["bundle_bytes"] == sum(
        (folder / f).stat().st_size for f in ("model.json", "model.safetensors"))
    assert variant["metrics"]["pt2_bytes"] == (folder / "model.pt2").stat().st_size
    wbz = folder / "model.wbz"
    assert variant["metrics"]["size_bytes"] == wbz.stat().st_size
    from engine.compress.encode import load

    exported = torch.export.load(str(folder / "model.pt2")).module()
    assert torch.allclose(load(wbz.read_bytes())(torch.ones(2, 4)), exported(torch.ones(2, 4)))
    assert torch.equal(load_bundle(folder)(torch.ones(2, 4)), exported(torch.ones(2, 4)))
    assert exported(torch.zeros(3, 4)).shape == (3, 3)
    assert "test accuracy" in capsys.readouterr().out


def test_regression_reports_mse_and_r2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {source: 'builtin:diabetes'}\nmodel: {source: 'builtin:logreg'}\n"
                      "train: {optimizer: lbfgs, batch_size: full, epochs: 5}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "result.json").read_text())["variants"][0]["metrics"]
    assert metrics["test_r2"] > 0.3 and metrics["test_mse"] > 0
    assert "test_accuracy" not in metrics


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"train": {"optimiser": "adam"}}))
    assert main(["run", str(recipe), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "did you mean 'optimizer'" in err
    assert "\n" not in err and "Traceback" not in err


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("DATASETS", "MODELS", "OPTIMIZERS", "SCHEDULES", "REGULARIZERS", "nesterov",
                 "cosine_restarts", "early_stopping", "breast_cancer", "step_size",
                 "COMPRESSION", "deep_compression", "static_int8"):
        assert word in out
    assert main(["list", "optimizers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [e["name"] for e in data["optimizers"]["entries"]]
    assert names == ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw",
                     "lbfgs", "newton", "bfgs"]
    assert main(["list", "optimisers"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted((ROOT / "assets" / "recipes").glob("*")),
                         ids=lambda p: p.name)
def test_shipped_recipes_run_as_a_subprocess(recipe, tmp_path):
    """The README's command, end to end, in a fresh interpreter with the progress bar on."""
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch" in proc.stderr  # tqdm's bar
    result = json.loads((tmp_path / "result.json").read_text())
    metrics = result["variants"][0]["metrics"]
    assert metrics.get("test_accuracy", 0) > 0.9
