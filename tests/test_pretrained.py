"""A real pretrained CNN through the workbench: EfficientNet-Lite0 with the ImageNet weights
its package ships (nothing downloaded), uploaded as a `.pt2`, scored label-free on photo
crops. The full table per technique is the benchmark's (README, "A pretrained CNN")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.models import build_model, set_training
from engine.recipe import ModelConfig
from tests.benchmarks.bench_pretrained import SIZE, photo_crops, save_lite0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite0")
    save_lite0(folder / "lite0.pt2")
    np.savez(folder / "crops.npz", X=photo_crops(40, seed=1))
    return folder


def test_the_uploaded_graph_shows_every_layer_and_predicts_as_published(lite0):
    import matplotlib.cbook
    from PIL import Image

    model = build_model(ModelConfig(source=str(lite0 / "lite0.pt2")), (3, SIZE, SIZE), 1000,
                        seed=0)
    set_training(model, False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 49 and sum(m.groups > 1 for m in convs) == 16  # 16 depthwise
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photo = Image.open(fh).convert("RGB")
        w, h = photo.size
        side = min(w, h)
        photo = photo.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2,
                            (h + side) // 2)).resize((SIZE, SIZE), Image.BICUBIC)
    x = (np.asarray(photo, dtype=np.float32) - 127.0) / 128.0
    with torch.no_grad():
        top = model(torch.as_tensor(x.transpose(2, 0, 1))[None]).argmax(1).item()
    assert top == 652  # ImageNet's "military uniform": the weights are the real ones


def test_label_free_pruning_and_int8_on_the_pretrained_model(lite0):
    result = engine.run({
        "data": {"source": str(lite0 / "crops.npz"), "labels": "teacher",
                 "standardize": False, "test_fraction": 0.5, "val_fraction": 0.1},
        "model": {"source": str(lite0 / "lite0.pt2")}, "train": {"epochs": 0},
        "compress": [{"technique": "prune", "amount": 0.5, "scope": "global",
                      "finetune_epochs": 0},
                     {"technique": "quantize", "method": "static_int8",
                      "calibration_rows": 16}]})
    baseline, pruned, int8 = result["variants"]
    assert baseline["metrics"]["test_agreement"] == 1.0
    notes = " ".join(pruned["metrics"]["notes"])
    assert "Kept whole as sensitive" in notes and "_conv_stem" in notes and "_fc" in notes
    assert "_blocks.15._project_conv" in notes  # the pointwise convolutions were pruned
    assert pruned["metrics"]["nonzero_params"] < 0.75 * baseline["metrics"]["params"]
    assert int8["metrics"]["runtime"] == "onnxruntime"
    assert int8["metrics"]["size_bytes"] < baseline["metrics"]["size_bytes"] / 3
    for v in (pruned, int8):
        assert 0.5 <= v["metrics"]["test_agreement"] <= 1.0
