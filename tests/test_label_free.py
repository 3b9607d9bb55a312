"""Labels for a pretrained model: none at all (`data.labels: "teacher"`: the original model's
own predictions are the labels, and every variant is scored by its agreement with it,
`test_agreement`), or labels in the model's own output space (`data.label_space: "model"`:
integer labels index its outputs, never renumbered)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

import engine
from engine.data import load_data
from engine.errors import UserError
from engine.recipe import DataConfig


@pytest.fixture
def pretrained(tmp_path):
    """A small ResNet folder with its own class names, and 120 unlabeled RGB images."""
    import torch
    import transformers

    config = transformers.ResNetConfig(num_labels=4, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic",
                                       id2label={0: "cat", 1: "dog", 2: "fox", 3: "owl"},
                                       label2id={"cat": 0, "dog": 1, "fox": 2, "owl": 3})
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(
        tmp_path / "resnet")
    X = load_data(DataConfig(source="builtin:shapes", params={"n_samples": 120}),
                  seed=0).X_train[:120]
    np.savez(tmp_path / "unlabeled.npz", X=np.clip(X, 0, 1).astype(np.float32))
    return tmp_path


@pytest.mark.slow
def test_every_variant_is_scored_by_its_agreement_with_the_original(pretrained):
    result = engine.run({
        "data": {"source": str(pretrained / "unlabeled.npz"), "labels": "teacher",
                 "standardize": False},
        "model": {"source": f"hf:{pretrained / 'resnet'}"}, "train": {"epochs": 0},
        "compress": [{"technique": "prune", "method": "magnitude", "amount": 0.3,
                      "finetune_epochs": 1},
                     {"technique": "quantize", "method": "static_int8",
                      "calibration_rows": 32}]})
    assert list(result["data"]["classes"]) == ["cat", "dog", "fox", "owl"]  # the model's own
    baseline, *variants = result["variants"]
    assert baseline["metrics"]["test_agreement"] == 1.0  # the original agrees with itself
    for v in result["variants"]:
        assert "test_accuracy" not in v["metrics"]  # there are no labels to be accurate on
        assert 0.0 <= v["metrics"]["test_agreement"] <= 1.0
    assert variants[-1]["metrics"]["runtime"] == "onnxruntime"


def test_a_zip_of_images_in_one_folder_needs_no_classes(pretrained):
    blob = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(blob, "w") as zf:
        for i in range(30):
            img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            zf.writestr(f"photos/{i}.png", buf.getvalue())
    (pretrained / "photos.zip").write_bytes(blob.getvalue())
    result = engine.run({
        "data": {"source": str(pretrained / "photos.zip"), "labels": "teacher",
                 "image_size": [16, 16], "standardize": False},
        "model": {"source": f"hf:{pretrained / 'resnet'}"}, "train": {"epochs": 0}})
    assert result["variants"][0]["metrics"]["test_agreement"] == 1.0
    with pytest.raises(UserError, match="2 classes"):  # with labels asked for, it has none
        load_data(DataConfig(source=str(pretrained / "photos.zip")), seed=0)


def test_a_teacher_needs_weights_and_labels_need_a_teacher(pretrained):
    with pytest.raises(UserError, match="a model with random weights cannot be that teacher"):
        engine.run({"data": {"source": str(pretrained / "unlabeled.npz"), "labels": "teacher"},
                    "model": {"source": "hfarch:resnet-tiny"}, "train": {"epochs": 0}})
    with pytest.raises(UserError, match="has no array named 'y'"):
        engine.run({"data": {"source": str(pretrained / "unlabeled.npz")},
                    "model": {"source": f"hf:{pretrained / 'resnet'}"}})
    with pytest.raises(UserError, match=r"data\.labels"):
        engine.run({"data": {"labels": "guess"}})


def test_labels_in_the_models_own_space_are_not_renumbered(pretrained):
    X = np.load(pretrained / "unlabeled.npz")["X"]
    y = np.where(np.arange(len(X)) % 2 == 0, 3, 0)  # only classes 0 and 3 of its 4 occur
    np.savez(pretrained / "labelled.npz", X=X, y=y)
    source = {"source": str(pretrained / "labelled.npz"), "standardize": False}
    model = {"source": f"hf:{pretrained / 'resnet'}"}
    result = engine.run({"data": {**source, "label_space": "model"}, "model": model,
                         "train": {"epochs": 1}})
    classes = result["data"]["classes"]  # the model's four, counted on the training part
    assert list(classes) == ["cat", "dog", "fox", "owl"]
    assert classes["dog"] == classes["fox"] == 0 and classes["cat"] > 0 and classes["owl"] > 0
    baseline = result["variants"][0]
    assert baseline["metrics"]["params"] > 0 and "test_accuracy" in baseline["metrics"]
    notes = " ".join(baseline["metrics"].get("notes", []))
    assert "head" not in notes  # the model's 4-way head was kept, not replaced by a 2-way
    np.savez(pretrained / "too_high.npz", X=X, y=np.full(len(X), 7))
    with pytest.raises(UserError, match="labels go up to 7 but the model has 4 outputs"):
        engine.run({"data": {"source": str(pretrained / "too_high.npz"),
                             "label_space": "model"}, "model": model})
    renumbered = load_data(DataConfig(**source), seed=0)  # the default renumbers: 2 classes
    assert renumbered.n_classes == 2


def test_label_free_fine_tuning_matches_the_originals_whole_distribution(pretrained):
    """Without labels, fine-tuning's loss is the KL divergence to the original model's
    outputs (distillation from it), not cross-entropy on its top-1 labels: the original
    itself has almost none, though its top-1 labels are far from its own probabilities.
    A model being recovered keeps its BatchNorm statistics; a fresh student does not."""
    import copy

    import torch

    from engine.compress import CompressContext
    from engine.metrics import relabel
    from engine.models import build_model
    from engine.runner import resolve
    from engine.train import to_tensors

    recipe = resolve({"data": {"source": str(pretrained / "unlabeled.npz"), "labels": "teacher",
                               "standardize": False},
                      "model": {"source": f"hf:{pretrained / 'resnet'}"},
                      "train": {"lr": 1e-12, "optimizer": "sgd"}})
    data = load_data(recipe.data, seed=0)
    original = build_model(recipe.model, data.input_shape, 4, seed=0)
    data = relabel(data, original)
    dev = torch.device("cpu")
    ctx = CompressContext(tensors=to_tensors(data, dev), task=data.task,
                          input_shape=data.input_shape, n_out=4, train_cfg=recipe.train,
                          model_cfg=recipe.model, data=data, device=dev, seed=0,
                          baseline_model=original)
    recovered = copy.deepcopy(original)
    history = ctx.finetune(recovered, 1, variant="prune")
    assert history["train_loss"][0] < 0.05
    stats = [(n, b) for n, b in original.named_buffers() if n.endswith("running_mean")]
    assert stats and all(torch.equal(b, recovered.get_buffer(n)) for n, b in stats)
    fresh = copy.deepcopy(original)  # a distillation student learns its own statistics
    ctx.finetune(fresh, 1, variant="distill", fresh=True)
    assert not all(torch.equal(b, fresh.get_buffer(n)) for n, b in stats)
    ctx.baseline_model = None  # no original to match: cross-entropy on its top-1 labels
    assert ctx.finetune(copy.deepcopy(original), 1, variant="prune")["train_loss"][0] > 0.5


@pytest.mark.slow
def test_a_model_whose_outputs_are_not_classes_is_scored_by_cosine(pretrained, tmp_path):
    """An embedder (here a small CNN giving 16-wide vectors, uploaded as .pt2) with
    `data.task: "regression"`: the original's output vectors are the targets, fine-tuning
    matches them, and `test_agreement` is the mean cosine similarity to them, in PyTorch,
    in ONNX Runtime and in the deployed file."""
    import torch
    from torch import nn

    from engine.models import save_model

    X = np.load(pretrained / "unlabeled.npz")["X"]
    torch.manual_seed(0)
    embedder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16))
    save_model(embedder, X.shape[1:], tmp_path / "embedder.pt2")
    result = engine.run({
        "data": {"source": str(pretrained / "unlabeled.npz"), "labels": "teacher",
                 "task": "regression", "standardize": False},
        "model": {"source": str(tmp_path / "embedder.pt2")}, "train": {"epochs": 0},
        "export": {"onnx": True},
        "compress": [{"technique": "prune", "amount": 0.6, "spare": "none",
                      "finetune_epochs": 1},
                     {"technique": "quantize", "method": "static_int8",
                      "calibration_rows": 32}]})
    assert result["data"]["task"] == "regression" and result["data"]["n_out"] == 16
    baseline, pruned, int8 = result["variants"]
    assert baseline["metrics"]["test_agreement"] == pytest.approx(1.0, abs=1e-6)
    for v in (pruned, int8):
        assert "test_accuracy" not in v["metrics"] and "test_cosine" not in v["metrics"]
        assert 0.0 < v["metrics"]["test_agreement"] < 1.0
    assert int8["metrics"]["runtime"] == "onnxruntime"
    assert baseline["metrics"]["deploy"]["onnx"]["cosine"] == pytest.approx(1.0, abs=1e-4)


def test_a_collapsed_variant_says_so():
    from engine.measure import COLLAPSED, collapsed

    assert COLLAPSED == 0.5
    assert collapsed("prune-magnitude", 0.31, "classification") == (
        "prune-magnitude has collapsed: its top-1 predictions match the original's on only "
        "31% of the test rows; fine-tune it longer, or compress less (a smaller amount, more "
        "bits, a larger rank).")
    assert "cosine similarity to the original's is only 0.42" in collapsed("x", 0.42,
                                                                            "regression")
