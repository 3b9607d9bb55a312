"""The shipped `.wbz` file: lossless, and only as small as the weights really allow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.compress.encode import _huffman, _unhuffman, breakdown, decode, encode, load
from engine.models import build_model
from engine.recipe import ModelConfig

X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def mlp() -> torch.nn.Module:
    return build_model(ModelConfig(source="builtin:mlp"), (1, 8, 8), 10, seed=0)


def test_dense_round_trip_is_exact_and_costs_four_bytes_a_weight():
    model = mlp()
    blob = encode(model)
    params = sum(p.numel() for p in model.parameters())
    assert 4 * params < len(blob) < 4 * params + 1024  # raw floats plus a small header
    assert torch.equal(load(blob)(X), model(X))


def test_cnn_and_lowrank_style_nesting_round_trip():
    model = build_model(ModelConfig(source="builtin:cnn"), (1, 8, 8), 10, seed=0)
    model.fc1 = torch.nn.Sequential(torch.nn.Linear(128, 8, bias=False),
                                    torch.nn.Linear(8, 128))
    assert torch.equal(load(encode(model))(X), model(X))


def shared_and_pruned(amount: float, bits: int) -> torch.nn.Module:
    model = mlp()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.out):
            w = layer.weight
            w[w.abs() <= w.abs().flatten().quantile(amount)] = 0
            grid = torch.linspace(float(w.min()), float(w.max()), 2 ** bits)
            nz = w != 0
            w[nz] = grid[(w[nz][:, None] - grid[None]).abs().argmin(1)]
    return model


def test_sparse_codebook_weights_shrink_and_huffman_only_helps():
    model = shared_and_pruned(0.9, 5)
    fixed, coded = encode(model), encode(model, huffman=True)
    dense = len(encode(mlp()))
    assert len(coded) <= len(fixed) < dense / 15
    for blob in (fixed, coded):
        assert torch.equal(load(blob)(X), model(X))
    encodings = {r["tensor"]: r["encoding"] for r in breakdown(coded)}
    assert "codebook" in encodings["fc1.weight"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_affine_weights_cost_about_k_bits(bits):
    model = mlp()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.out):
            w = layer.weight
            lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
            scale = (hi - lo) / (2 ** bits - 1)
            w.copy_(lo + scale * torch.round((w - lo) / scale))
    blob = encode(model)
    weights = sum(layer.weight.numel() for layer in (model.fc1, model.fc2, model.out))
    biases = sum(layer.bias.numel() for layer in (model.fc1, model.fc2, model.out))
    expected = weights * bits / 8 + biases * 4 + 202 * 8  # codes, biases, row offsets/steps
    assert len(blob) < expected + 1024
    assert torch.allclose(load(blob)(X), model(X), atol=1e-5)


def test_fp16_values_are_stored_in_two_bytes():
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    blob = encode(model)
    params = sum(p.numel() for p in model.parameters())
    assert len(blob) < 2 * params + 1024
    assert torch.equal(load(blob)(X), model(X))


def test_huffman_codes_round_trip_and_never_beat_the_entropy():
    rng = np.random.default_rng(0)
    symbols = rng.choice(8, size=5000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01])
    table, stream, n_bits = _huffman(symbols, 8)
    assert np.array_equal(_unhuffman(table, stream, n_bits, len(symbols)), symbols)
    p = np.bincount(symbols, minlength=8) / len(symbols)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * len(symbols)
    assert entropy <= n_bits <= entropy + len(symbols)  # within a bit a symbol
    assert n_bits <= 3 * len(symbols)  # never worse than the fixed 3-bit width


def test_weights_only_file_for_a_graph_module(tmp_path):
    from engine.models import save_model

    save_model(mlp(), (1, 8, 8), tmp_path / "m.pt2")
    graph = torch.export.load(str(tmp_path / "m.pt2")).module()
    architecture, state = decode(encode(graph))
    assert architecture is None
    assert set(state) == set(graph.state_dict())
