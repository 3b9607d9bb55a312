"""Export with the preprocessing inside, parity with PyTorch, ONNX Runtime's own accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import engine
from engine import deploy
from engine.compress import COMPRESSORS, CompressContext, load_all
from engine.data import load_data
from engine.errors import UserError
from engine.export import ort_predict, ort_session
from engine.models import MODELS, build_model
from engine.runner import resolve
from engine.train import to_tensors, train

load_all()
CPU = torch.device("cpu")


def trained(arch: str, source: str = "builtin:digits", epochs: int = 4, **data_cfg):
    recipe = resolve({"data": {"source": source, **data_cfg},
                               "model": {"source": f"builtin:{arch}", "hidden": [32]},
                               "train": {"epochs": epochs, "early_stopping": None}})
    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, data.n_classes or 1, seed=0)
    tensors = to_tensors(data, CPU)
    train(model, data, recipe.train, device=CPU, seed=0, tensors=tensors)
    return model, data, recipe, tensors


@pytest.mark.slow
@pytest.mark.parametrize("arch", MODELS.names())
def test_every_builtin_exports_with_parity_and_equal_accuracy(arch):
    model, data, _, _ = trained(arch)
    info = deploy.report(deploy.export_model(model, data), data, model=model)
    assert info["parity_ok"], (info["max_abs_diff"], info["tolerance"])
    assert abs(info["onnx"]["accuracy"] - info["torch"]["accuracy"]) <= 0.005
    assert info["input"]["shape"] == ["batch", 1, 8, 8] and info["opset"] == 18
    for runtime in ("onnxruntime_cpu", "torch_eager"):
        timing = info["latency"][runtime]
        assert timing["p95_ms"] >= timing["median_ms"] > 0 and timing["throughput_per_s"] > 0
    assert info["threads"] == 1 and "processor" in info["machine"]


@pytest.mark.slow
def test_the_file_takes_raw_inputs_with_selection_and_scaling_inside():
    model, data, _, _ = trained("mlp", "builtin:breast_cancer",
                                feature_selection={"method": "kbest", "k": 8})
    file = deploy.export_model(model, data)
    raw = data.X_test_raw
    assert raw.shape[1] == 30 and data.input_shape == (8,)
    out = ort_predict(ort_session(file), raw)
    with torch.no_grad():
        ref = model(torch.as_tensor(data.preprocess.apply(raw))).numpy()
    assert np.allclose(out, ref, atol=1e-4)
    assert np.allclose(ort_predict(ort_session(file), raw[:1]), ref[:1], atol=1e-4)


@pytest.mark.parametrize("step", [
    {"technique": "prune", "amount": 0.8, "finetune_epochs": 1},
    {"technique": "lowrank", "rank_fraction": 0.25, "finetune_epochs": 1},
    {"technique": "quantize", "method": "uniform", "bits": 4, "finetune_epochs": 0},
    {"technique": "quantize", "method": "static_int8"},
], ids=lambda s: s.get("method", s["technique"]))
@pytest.mark.slow
def test_compressed_variants_export_too(step):
    model, data, recipe, tensors = trained("mlp")
    ctx = CompressContext(tensors=tensors, task=data.task, input_shape=data.input_shape,
                          n_out=data.n_classes, train_cfg=recipe.train,
                          model_cfg=recipe.model, data=data, device=CPU, seed=0)
    entry = COMPRESSORS.get(step["technique"])
    outcome = entry.fn(model, entry.resolve({k: v for k, v in step.items()
                                             if k != "technique"}, "compress[0]"), ctx)
    if outcome.runtime == "torch":
        info = deploy.report(deploy.export_model(outcome.model, data), data,
                             model=outcome.model)
        assert info["parity_ok"]
        assert abs(info["onnx"]["accuracy"] - info["torch"]["accuracy"]) <= 0.005
    else:  # the int8 file gets the same preprocessing front
        info = deploy.report(deploy.with_preprocessing(outcome.onnx_bytes, data), data)
        assert abs(info["onnx"]["accuracy"] - outcome.metrics["test_accuracy"]) <= 0.005


def test_a_model_that_cannot_export_gets_one_sentence():
    class Odd(torch.nn.Module):  # a branch on the data: no static graph can hold it
        def forward(self, x):
            flat = x.reshape(len(x), -1)
            return flat[:, :10] if bool(flat.sum() > 0) else -flat[:, :10]

    _, data, _, _ = trained("logreg", epochs=1)
    with pytest.raises(UserError, match="could not be exported to ONNX"):
        deploy.export_model(Odd(), data, name="odd")


@pytest.mark.slow
def test_recipe_export_writes_a_deployable_file_per_variant(tmp_path):
    result = engine.run({"data": {"source": "builtin:iris"}, "train": {"epochs": 5},
                         "export": {"onnx": True},
                         "compress": [{"technique": "quantize", "method": "fp16"}]},
                        out_dir=tmp_path)
    for variant in result["variants"]:
        info = variant["metrics"]["deploy"]
        assert (tmp_path / info["file"]).is_file() and info["parity_ok"]
    snippet = deploy.predict_snippet("baseline.deploy.onnx", info, ["a", "b", "c"])
    assert '"input": x' in snippet and "csv.DictReader" in snippet  # a table: its CSV rows
    assert "('sepal length (cm)', None)" in snippet  # each input named, in order
    compile(snippet, "predict.py", "exec")


@pytest.mark.slow
def test_the_shipped_onnx_file_carries_sharing_k_bit_and_fp16(tmp_path):
    """Each compressed variant's ONNX file is smaller than the baseline's and gives the same
    outputs as the variant in PyTorch; a pruned-only one says why it is not."""
    result = engine.run({
        "data": {"source": "builtin:digits"}, "model": {"source": "builtin:mlp",
                                                        "hidden": [64]},
        "train": {"epochs": 3}, "export": {"onnx": True},
        "compress": [{"technique": "prune", "method": "magnitude", "amount": 0.5,
                      "finetune_epochs": 0},
                     {"technique": "share", "bits": 4, "finetune_epochs": 0},
                     {"technique": "quantize", "method": "uniform", "bits": 4},
                     {"technique": "quantize", "method": "fp16"}]}, out_dir=tmp_path)
    base, pruned, *packed = result["variants"]
    size = {v["name"]: (tmp_path / v["metrics"]["deploy"]["file"]).stat().st_size
            for v in result["variants"]}
    assert size[pruned["name"]] >= 0.95 * size[base["name"]]
    assert any("no smaller than the baseline's" in n for n in pruned["metrics"]["notes"])
    for v in packed:
        assert size[v["name"]] < 0.7 * size[base["name"]], (v["name"], size)
    for name in ("share", "quantize-uniform"):  # 4 bits: uint4 levels, two to a byte
        proto = onnx.load(tmp_path / f"{name}/model.onnx")
        kinds = {t.data_type for t in proto.graph.initializer}
        assert onnx.TensorProto.UINT4 in kinds and onnx.TensorProto.UINT8 not in kinds, name
        assert size[name] < 0.45 * size[base["name"]], size  # weights 8x smaller, the
        #                                                        graph's overhead stays
        assert v["metrics"]["deploy"]["parity_ok"], v["name"]
        assert not any("no smaller" in n for n in v["metrics"]["notes"])


@pytest.mark.slow
def test_predict_py_reads_real_csv_rows_and_agrees_with_the_engine(tmp_path):
    """A table with a text column: the exported file takes its one-hot layout, named input
    by input, and the predict.py the Deploy page offers turns the CSV's own rows into it."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    rows = ["size,colour,weight,label"]
    for i in range(120):
        colour = ["red", "green", "blue"][i % 3]
        size = rng.normal(3 if colour == "red" else 0, 1)
        rows.append(f"{size:.3f},{colour},{rng.normal():.3f},{'big' if size > 1 else 'small'}")
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    recipe = resolve({"data": {"source": str(table)}, "model": {"hidden": [16]},
                      "train": {"epochs": 30}})
    data = load_data(recipe.data, seed=0)
    assert [c.get("equals") for c in data.encoding] == [None, None, "blue", "green", "red"]
    model = build_model(recipe.model, data.input_shape, data.n_outputs, seed=0)
    train(model, data, recipe.train, device=torch.device("cpu"), seed=0)
    file = deploy.export_model(model, data, name="t")
    info = deploy.report(file, data, model=model)
    assert [c["name"] for c in info["input"]["columns"]] == [
        "size", "weight", "colour=blue", "colour=green", "colour=red"]
    (tmp_path / "t.deploy.onnx").write_bytes(file)
    (tmp_path / "predict.py").write_text(deploy.predict_snippet("t.deploy.onnx", info,
                                                                data.class_names))
    out = subprocess.run([sys.executable, "predict.py", str(table)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    from engine.data import load_arrays

    X, _, _ = load_arrays(recipe.data)
    with torch.no_grad():
        scores = model(torch.as_tensor(data.preprocess.apply(X))).numpy()
    assert out == [data.class_names[i] for i in scores.argmax(1)]


def test_an_uploaded_onnx_model_gets_the_onnx_runtime_path(tmp_path):
    model, data, _, _ = trained("mlp", "builtin:iris", epochs=30)
    from engine.export import onnx_bytes

    (tmp_path / "m.onnx").write_bytes(onnx_bytes(model, data.input_shape))
    result = engine.run({"data": {"source": "builtin:iris"},
                         "model": {"source": str(tmp_path / "m.onnx")}}, out_dir=tmp_path / "o")
    base, int8 = result["variants"]
    assert base["metrics"]["operators"] and base["metrics"]["params"] == 4 * 32 + 32 + 32 * 3 + 3
    with torch.no_grad():
        torch_acc = float((model(torch.as_tensor(data.X_test)).argmax(1)
                           == torch.as_tensor(data.y_test)).float().mean())
    assert base["metrics"]["test_accuracy"] == pytest.approx(torch_acc, abs=0.005)
    assert int8["name"] == "quantize-dynamic_int8" and int8["metrics"]["size_ratio"] > 1
    assert "test_accuracy" in int8["metrics"] and int8["metrics"]["latency_ms"] > 0
    # a dataset its input does not fit: timed and measured, not scored, said so
    other = engine.run({"data": {"source": "builtin:wine"},
                        "model": {"source": str(tmp_path / "m.onnx")}})
    assert "test_accuracy" not in other["variants"][0]["metrics"]
    assert "does not fit" in " ".join(other["variants"][0]["metrics"]["notes"])
