"""Distillation, low-rank factorization, weight sharing and the Deep Compression preset."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.compress.distill
import engine.compress.lowrank
import engine.compress.presets
import engine.compress.share
from engine.compress import COMPRESSORS, CompressContext, StepResult, clone, prunable
from engine.compress.base import hinton_loss
from engine.compress.lowrank import choose_rank, semi_nmf, svd_factor
from engine.compress.presets import concat_histories
from engine.compress.share import kmeans_1d
from engine.errors import UserError
from engine.models import build_model
from engine.recipe import ModelConfig
from engine.runner import resolve
from tests.helpers import trained_context


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, CompressContext]:
    return trained_context({"data": {"source": "builtin:digits"},
                            "model": {"source": "builtin:mlp", "hidden": [128, 64]},
                            "train": {"epochs": 10, "early_stopping": None}})


def run(name: str, model: nn.Module, ctx: CompressContext, **options) -> StepResult:
    entry = COMPRESSORS.get(name)
    return entry.fn(model, entry.resolve(options, "compress[0]"), ctx)


def accuracy(model: nn.Module, ctx: CompressContext) -> float:
    return ctx.evaluate(model)["accuracy"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distinct_nonzeros(model: nn.Module) -> dict[str, int]:
    return {name: len(torch.unique(layer.weight[layer.weight != 0]))
            for name, layer in prunable(model)}


def prune_available() -> bool:
    return (Path(engine.compress.__file__).parent / "prune.py").is_file()


FAST = [("distill", {"epochs": 1}), ("distill", {"epochs": 1, "mode": "feature"}),
        ("lowrank", {"finetune_epochs": 1}), ("lowrank", {"method": "nmf", "finetune_epochs": 1}),
        ("share", {"finetune_epochs": 1}),
        ("deep_compression", {"prune_epochs": 1, "share_epochs": 1})]


@pytest.mark.parametrize("name, options", FAST)
def test_returns_a_new_model_and_leaves_the_input_unchanged(setup, name, options):
    if name == "deep_compression" and not prune_available():
        pytest.skip("engine/compress/prune.py is not written yet")
    model, ctx = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(name, model, ctx, **options)
    assert result.model is not model
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.notes and result.history["epoch"]


def context(data_source: str, model_section: dict, epochs: int
            ) -> tuple[nn.Module, CompressContext]:
    return trained_context({"data": {"source": data_source}, "model": model_section,
                            "train": {"epochs": epochs, "early_stopping": None}})


def test_every_family_runs_on_a_cnn_and_on_a_regression():
    cnn, ctx = context("builtin:digits", {"source": "builtin:cnn", "channels": [8, 16],
                                          "hidden": [32]}, epochs=1)
    student = run("distill", cnn, ctx, epochs=1).model
    assert (student.conv1.out_channels, student.conv2.out_channels) == (4, 8)
    small = run("lowrank", cnn, ctx, finetune_epochs=1).model
    assert isinstance(small.conv2, nn.Sequential) and isinstance(small.conv2[0], nn.Conv2d)
    shared = run("share", cnn, ctx, bits=2, finetune_epochs=1).model
    assert all(n <= 4 for n in distinct_nonzeros(shared).values())
    mlp, ctx = context("builtin:diabetes", {"source": "builtin:mlp", "hidden": [16]}, epochs=3)
    for mode in ("response", "feature"):
        result = run("distill", mlp, ctx, epochs=2, mode=mode)
        assert result.model(ctx.tensors["X_test"]).shape == (len(ctx.tensors["X_test"]), 1)
        assert "val_r2" in result.history


# --- distill -------------------------------------------------------------------------------

def test_hinton_loss_is_the_soft_term_at_alpha_1_and_cross_entropy_at_0():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    same = hinton_loss(t, t, y, task="classification", temperature=4.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    hard = hinton_loss(s, t, y, task="classification", temperature=4.0, alpha=0.0)
    assert torch.allclose(hard, nn.functional.cross_entropy(s, y))
    reg = hinton_loss(s[:, :1], t[:, :1], y.float(), task="regression", temperature=1.0,
                      alpha=0.5)
    expected = 0.5 * ((s[:, 0] - t[:, 0]) ** 2).mean() + 0.5 * ((s[:, 0] - y) ** 2).mean()
    assert torch.allclose(reg, expected)


def test_width_multiplier_student_is_smaller_and_nearly_as_accurate(setup):
    model, ctx = setup
    result = run("distill", model, ctx, epochs=20)
    student = result.model
    names = [n for n, _ in model.named_children()]
    assert [n for n, _ in student.named_children()] == names  # same architecture
    assert (student.fc1.out_features, student.fc2.out_features) == (64, 32)
    assert n_params(student) < n_params(model)
    teacher_acc, student_acc = accuracy(model, ctx), accuracy(student, ctx)
    print(f"\ndistill: teacher {n_params(model)} params, test accuracy {teacher_acc:.3f}; "
          f"student {n_params(student)} params, {student_acc:.3f}")
    assert student_acc >= teacher_acc - 0.05


def test_feature_mode_returns_the_bare_student(setup):
    model, ctx = setup
    student_cfg = {"source": "builtin:mlp", "hidden": [24]}
    result = run("distill", model, ctx, epochs=2, mode="feature", student=student_cfg)
    bare = build_model(resolve({"model": student_cfg}).model, ctx.input_shape,
                       ctx.n_out, seed=0)
    student = result.model
    assert type(student) is nn.Sequential
    assert dict(student.named_parameters()).keys() == dict(bare.named_parameters()).keys()
    assert [n for n, _ in student.named_modules()] == [n for n, _ in bare.named_modules()]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in student.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())  # the teacher's too
    assert accuracy(student, ctx) > 0.5
    print(f"\ndistill feature mode, 2 epochs: student accuracy {accuracy(student, ctx):.3f}")


def test_uploaded_teacher_needs_a_student_and_bad_students_are_named(setup):
    model, ctx = setup
    uploaded = dataclasses.replace(ctx, model_cfg=ModelConfig(source="teacher.pt2"))
    model = copy.deepcopy(model)
    model.workbench_builder = {"kind": "pt2", "file": "graph.pt2"}  # what a .pt2 carries
    with pytest.raises(UserError, match=r"its widths are unknown.*student"):
        run("distill", model, uploaded, epochs=1)
    result = run("distill", model, uploaded, epochs=1, student={"hidden": [8]})
    assert result.model.fc1.out_features == 8
    with pytest.raises(UserError, match=r"student.*hidden"):
        run("distill", model, ctx, epochs=1, student={"hidden": [0]})


# --- lowrank -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(20, 12), (5, 20)),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 9, 9)),
    (nn.Conv1d(4, 6, 5, padding=2), (2, 4, 16)),
])
def test_svd_at_full_rank_reproduces_the_layer(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    weight = layer.weight.detach().clone()
    full = min(weight.shape[0], weight[0].numel())
    factored = svd_factor(layer, full)
    assert torch.allclose(factored(x), layer(x), atol=1e-4)
    assert torch.equal(layer.weight, weight)  # pure
    low = svd_factor(layer, 2)
    assert n_params(low) < n_params(layer)
    assert low(x).shape == layer(x).shape


def test_lowrank_keeps_names_saves_parameters_and_reports_errors(setup):
    model, ctx = setup
    result = run("lowrank", model, ctx, rank_fraction=0.5, finetune_epochs=3)
    small = result.model
    assert isinstance(small.fc1, nn.Sequential) and small.fc1[0].out_features == 32
    assert n_params(small) < n_params(model)
    assert any("relative error" in n for n in result.notes)
    print(f"\nlowrank svd 50%: {n_params(model)} -> {n_params(small)} params, accuracy "
          f"{accuracy(model, ctx):.3f} -> {accuracy(small, ctx):.3f}; {result.notes}")
    assert accuracy(small, ctx) >= accuracy(model, ctx) - 0.05


def test_energy_picks_the_smallest_rank_that_keeps_it(setup):
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), rank_fraction=0.1, energy=0.9) == 2
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), rank_fraction=0.5, energy=0.0) == 2
    model, ctx = setup
    energy = 0.8
    small = run("lowrank", model, ctx, energy=energy, finetune_epochs=0).model
    factorized = 0
    for name, layer in prunable(model):
        if not isinstance(small.get_submodule(name), nn.Sequential):
            continue
        factorized += 1
        rank = small.get_submodule(name)[0].out_features
        S = torch.linalg.svdvals(layer.weight.detach().double())
        kept = (S ** 2).cumsum(0) / (S ** 2).sum()
        assert kept[rank - 1] >= energy and (rank == 1 or kept[rank - 2] < energy)
    assert factorized >= 1


def test_nmf_runs_with_a_non_negative_first_factor(setup):
    model, ctx = setup
    result = run("lowrank", model, ctx, method="nmf", finetune_epochs=0)
    assert (result.model.fc1[0].weight >= 0).all()
    errors = [n for n in result.notes if "relative error" in n]
    assert errors and all("SVD at this rank" in n for n in errors)
    print(f"\nlowrank nmf: {errors}")
    W = torch.randn(30, 20, dtype=torch.float64)
    F, G = semi_nmf(W, 10, seed=0)
    error = float((W - F @ G.T).norm() / W.norm())
    S = torch.linalg.svdvals(W)
    assert (G >= 0).all() and float(S[10:].norm() / S.norm()) <= error < 1.0


# --- share ---------------------------------------------------------------------------------

def test_kmeans_1d_starts_linear_and_converges_to_the_means():
    values = torch.cat([torch.full((5,), -1.0), torch.full((5,), 2.0)]).double().numpy()
    centroids, labels = kmeans_1d(values, 2)
    assert sorted(centroids) == [-1.0, 2.0]
    assert len(set(labels[:5])) == 1 and labels[0] != labels[-1]


def test_share_keeps_at_most_2_to_the_bits_values_and_the_zeros(setup):
    model, ctx = setup
    sparse = clone(model)
    with torch.no_grad():
        sparse.fc1.weight[:, ::3] = 0
        sparse.fc2.weight[:10] = 0
    zeros = {name: layer.weight == 0 for name, layer in prunable(sparse)}
    for epochs in (0, 2):
        result = run("share", sparse, ctx, bits=3, finetune_epochs=epochs, correct="none")
        assert all(n <= 8 for n in distinct_nonzeros(result.model).values())
        for name, layer in prunable(result.model):
            assert (layer.weight[zeros[name]] == 0).all()
        if epochs == 0:  # biases are not shared (nor, with correct: none, corrected)
            assert torch.equal(result.model.fc1.bias, sparse.fc1.bias)
    assert result.huffman is True
    assert run("share", model, ctx, huffman=False, finetune_epochs=0).huffman is False


def test_share_at_5_bits_keeps_the_accuracy(setup):
    model, ctx = setup
    result = run("share", model, ctx, bits=5, finetune_epochs=3)
    counts = distinct_nonzeros(result.model)
    assert all(n <= 32 for n in counts.values())
    before, after = accuracy(model, ctx), accuracy(result.model, ctx)
    print(f"\nshare 5 bits: values per layer {counts}, accuracy {before:.3f} -> {after:.3f}")
    assert after >= before - 0.03


# --- deep_compression ----------------------------------------------------------------------

def test_concat_histories_renumbers_epochs():
    a = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "time_s": [1.0, 2.0]}
    b = {"epoch": [1], "train_loss": [0.4], "time_s": [0.5]}
    assert concat_histories(a, {}, b) == {"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.4],
                                          "time_s": [1.0, 2.0, 2.5]}
    assert concat_histories(None, {}) is None


def test_deep_compression_prunes_shares_and_huffman_codes(setup):
    if not prune_available():
        pytest.skip("engine/compress/prune.py is not written yet")
    model, ctx = setup
    events = []
    ctx = dataclasses.replace(ctx, on_progress=events.append)
    result = run("deep_compression", model, ctx, amount=0.9, bits=5, prune_epochs=2,
                 share_epochs=1)
    weights = [layer.weight for _, layer in prunable(result.model)]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sparsity == pytest.approx(0.9, abs=0.01)
    assert all(n <= 32 for n in distinct_nonzeros(result.model).values())
    assert result.huffman is True
    assert result.history["epoch"] == [1, 2, 3]
    assert [e["epoch"] for e in events] == [1, 2, 3]
    assert {e["variant"] for e in events} == {"deep_compression"}
    print(f"\ndeep_compression: sparsity {sparsity:.3f}, accuracy "
          f"{accuracy(model, ctx):.3f} -> {accuracy(result.model, ctx):.3f}")
