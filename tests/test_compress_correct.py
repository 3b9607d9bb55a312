"""Statistics correction after compression: the reference's per-channel output mean and std
come back, zeros stay zeros, and the compressed model moves closer to the original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import engine.compress.prune  # noqa: F401 - registers "prune"
from engine.compress import COMPRESSORS
from engine.compress.correct import match_statistics
from engine.compress.prune import magnitude_mask
from tests.helpers import trained_context


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _pruned(model: nn.Module, amount: float) -> nn.Module:
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.mul_(magnitude_mask(m.weight, amount))
    return pruned


def _moments(model: nn.Module, index: int, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-channel mean and std of layer `index`'s output on X."""
    with torch.no_grad():
        out = model[:index + 1](X)
    dims = [0, 2, 3] if out.ndim == 4 else [0]
    return out.mean(dims), out.std(dims, unbiased=False)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_each_normalization_gets_the_references_statistics_back(data):
    reference = _bn_net()
    pruned = _pruned(reference, 0.6)
    zeros = [int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    before = [_moments(pruned, i, data) for i in (1, 4, 7)]
    assert match_statistics(pruned, reference, data) == 4  # three BatchNorms, the Linear
    for k, i in enumerate((1, 4, 7)):
        mean, std = _moments(pruned, i, data)
        ref_mean, ref_std = _moments(reference, i, data)
        # the first BatchNorm sees uncorrected inputs: exact; later ones follow corrections
        # measured batch by batch, so nearly
        tol = 1e-4 if k == 0 else 0.05
        assert torch.allclose(mean, ref_mean, atol=tol * ref_std.max())
        assert torch.allclose(std, ref_std, rtol=tol, atol=1e-6)
        assert (before[k][1] - ref_std).abs().mean() > 5 * (std - ref_std).abs().mean()
    # the convolutions keep their zeros: the correction lives in the BatchNorm affines
    assert zeros == [int((m.weight == 0).sum()) for m in pruned.modules()
                     if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        ref_out, out = reference(data), pruned(data)
        uncorrected = _pruned(reference, 0.6)(data)
    assert (out - ref_out).norm() < 0.5 * (uncorrected - ref_out).norm()


def test_a_linear_layers_bias_and_scale_carry_it_and_zeros_stay_zeros(data):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(432, 64), nn.ReLU(),
                              nn.Linear(64, 10)).eval()
    pruned = _pruned(reference, 0.8)
    zeros = [int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Linear)]
    match_statistics(pruned, reference, data)
    mean, std = _moments(pruned, 1, data)
    ref_mean, ref_std = _moments(reference, 1, data)
    assert torch.allclose(mean, ref_mean, atol=1e-4) and torch.allclose(std, ref_std, rtol=1e-3)
    assert zeros == [int((m.weight == 0).sum()) for m in pruned.modules()
                     if isinstance(m, nn.Linear)]
    # without weight scaling (values on a codebook) only the means move
    frozen = _pruned(reference, 0.8)
    weights = [m.weight.clone() for m in frozen.modules() if isinstance(m, nn.Linear)]
    match_statistics(frozen, reference, data, scale_weights=False)
    assert all(torch.equal(w, m.weight) for w, m in
               zip(weights, [m for m in frozen.modules() if isinstance(m, nn.Linear)],
                   strict=True))
    mean, _ = _moments(frozen, 1, data)
    assert torch.allclose(mean, ref_mean, atol=1e-4)


def test_pruning_corrects_by_default_and_says_so():
    model, ctx = trained_context({"data": {"source": "builtin:digits"},
                                  "model": {"source": "builtin:cnn", "channels": [8, 16]},
                                  "train": {"epochs": 4, "early_stopping": None}})
    entry = COMPRESSORS.get("prune")
    runs = {c: entry.fn(model, entry.resolve({"amount": 0.8, "finetune_epochs": 0,
                                              "correct": c}, "compress[0]"), ctx)
            for c in ("stats", "none")}
    assert any("Corrected the outputs of" in n for n in runs["stats"].notes)
    assert not any("Corrected" in n for n in runs["none"].notes)
    scores = {c: ctx.evaluate(r.model)["accuracy"] for c, r in runs.items()}
    assert scores["stats"] >= scores["none"] - 0.02, scores


def test_sharing_and_k_bit_keep_their_values_when_corrected():
    """Shared and k-bit weights stay on their codebook or grid: only biases move."""

    model, ctx = trained_context({"data": {"source": "builtin:digits"},
                                  "model": {"source": "builtin:mlp", "hidden": [32]},
                                  "train": {"epochs": 4, "early_stopping": None}})
    for technique, options, levels in (("share", {"bits": 3}, 8),
                                       ("quantize", {"method": "uniform", "bits": 3}, 8)):
        entry = COMPRESSORS.get(technique)
        runs = {c: entry.fn(model, entry.resolve({**options, "finetune_epochs": 0,
                                                  "correct": c}, "compress[0]"), ctx)
                for c in ("stats", "none")}
        assert any("Corrected the outputs of" in n for n in runs["stats"].notes)
        for (name, a), (_, b) in zip(runs["stats"].model.named_parameters(),
                                     runs["none"].model.named_parameters(), strict=True):
            if name.endswith("weight"):  # the same values, on at most 2^bits levels a row
                assert torch.equal(a, b), name
                assert max(len(torch.unique(row)) for row in a) <= levels
            else:
                assert not torch.equal(a, b), name


def test_structured_pruning_corrects_a_narrowed_batchnorm_by_the_channels_it_kept(data):
    """Torch-Pruning slices a BatchNorm's running statistics, so they tell which of the
    original's channels a narrowed layer kept; its outputs get those channels' moments.
    A fresh BatchNorm (every channel's statistics alike) cannot tell, and is left alone."""
    from types import SimpleNamespace

    from engine.compress.channels import channel_prune
    from engine.compress.correct import _kept_channels

    fresh = _bn_net()
    reference = copy.deepcopy(fresh).train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the cumulative average over what it sees
    with torch.no_grad():
        reference(data)
    reference.eval()
    ctx = SimpleNamespace(input_shape=(3, 12, 12))
    pruned, _ = channel_prune(reference, 0.5, "l1", ctx)
    kept = _kept_channels(reference[1], pruned[1])
    assert kept is not None and len(kept) == 8 and bool((kept.diff() > 0).all())
    assert torch.equal(pruned[1].running_mean, reference[1].running_mean[kept])
    # the second BatchNorm lost half its inputs: its outputs moved, and come back
    kept = _kept_channels(reference[4], pruned[4])
    ref_mean, ref_std = (t[kept] for t in _moments(reference, 4, data))
    _, before = _moments(pruned, 4, data)
    assert match_statistics(pruned, reference, data) == 4  # three narrowed BatchNorms, the Linear
    mean, std = _moments(pruned, 4, data)
    assert torch.allclose(mean, ref_mean, atol=1e-4 * ref_std.max())
    assert torch.allclose(std, ref_std, rtol=1e-4, atol=1e-6)
    assert (before - ref_std).abs().mean() > 5 * (std - ref_std).abs().mean()
    narrowed, _ = channel_prune(fresh, 0.5, "l1", ctx)
    assert _kept_channels(fresh[1], narrowed[1]) is None
    assert match_statistics(narrowed, fresh, data) == 1  # only the Linear keeps its width
