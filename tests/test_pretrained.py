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
    np.savez(folder / "crops.npz", X=photo_crops(80, seed=1))
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


def _run(lite0, step: dict) -> tuple[dict, dict]:
    result = engine.run({
        "data": {"source": str(lite0 / "crops.npz"), "labels": "teacher",
                 "standardize": False, "test_fraction": 0.3, "val_fraction": 0.1},
        "model": {"source": str(lite0 / "lite0.pt2")}, "train": {"epochs": 0},
        "compress": [step]})
    baseline, variant = result["variants"]
    assert baseline["metrics"]["test_agreement"] == 1.0
    return baseline["metrics"], variant["metrics"]


def test_label_free_pruning_spares_the_sensitive_layers_and_corrects_the_statistics(lite0):
    """Without fine-tuning or labels, 50% magnitude pruning of this BatchNorm network kept
    0.005 agreement until the statistics correction (README's table: 0.66 with it); without
    the correction it collapses, and the run says so whenever a variant falls below 0.5."""
    from engine.compress.prune import magnitude_mask, spared
    from engine.measure import COLLAPSED

    step = {"technique": "prune", "amount": 0.5, "scope": "layer", "finetune_epochs": 0}
    base, pruned = _run(lite0, step)  # per layer: the masks rebuilt below are per layer
    notes = " ".join(pruned["notes"])
    assert "Kept whole as sensitive" in notes and "_conv_stem" in notes and "_fc" in notes
    assert "_blocks.15._project_conv 50.0%" in notes  # the pointwise convolutions went
    assert "Corrected the outputs of" in notes
    assert pruned["nonzero_params"] < 0.75 * base["params"]
    assert pruned["test_agreement"] >= COLLAPSED, pruned["test_agreement"]
    # the same masks without the correction, on every crop: collapsed
    model = build_model(ModelConfig(source=str(lite0 / "lite0.pt2")), (3, SIZE, SIZE), 1000,
                        seed=0)
    set_training(model, False)
    X = torch.as_tensor(np.load(lite0 / "crops.npz")["X"])
    with torch.no_grad():
        top = model(X).argmax(1)
        kept = set(spared(model, "auto"))
        for name, w in model.named_parameters():
            if w.ndim > 1 and name not in kept:
                w.mul_(magnitude_mask(w, 0.5))
        raw = float((model(X).argmax(1) == top).float().mean())
    assert raw < 0.2 < pruned["test_agreement"] - raw, (raw, pruned["test_agreement"])
