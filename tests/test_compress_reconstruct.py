"""Optimal Brain Surgeon reconstruction: the solver's algebra, the layers' input columns,
and what it buys a pruned network before any fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine.compress.prune  # noqa: F401 - registers "prune"
from engine.compress import COMPRESSORS
from engine.compress import reconstruct as module
from engine.errors import UserError
from tests.helpers import trained_context


@pytest.mark.parametrize("layer,shape", [
    (nn.Linear(6, 4, bias=False), (5, 3, 6)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (3, 4, 9, 9)),
    (nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False), (3, 4, 8, 8)),
    (nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect", bias=False),
     (3, 4, 7, 7)),
    (nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False), (3, 4, 20)),
], ids=["linear", "conv-strided", "conv-same-grouped", "depthwise-reflect", "conv1d"])
def test_each_layers_columns_dotted_with_its_weight_rows_give_its_outputs(layer, shape):
    """What the covariance is built from must be exactly what each output row multiplies:
    the unfolded patches, grouped and padded as the layer pads."""
    x = torch.randn(shape)
    cols = module._columns(layer, x)  # (groups, positions, d)
    g = cols.shape[0]
    w = layer.weight.detach().reshape(g, layer.weight.shape[0] // g, -1)
    out = torch.einsum("gpd,grd->gpr", cols, w)
    expected = layer(x).detach()
    if isinstance(layer, nn.Linear):
        assert torch.allclose(out[0], expected.reshape(-1, expected.shape[-1]), atol=1e-5)
    else:  # (N, C_out, *spatial) -> (groups, N·positions, C_out/g)
        n, c = expected.shape[:2]
        per_group = expected.reshape(n, g, c // g, -1).permute(1, 0, 3, 2).reshape(g, -1,
                                                                                 c // g)
        assert torch.allclose(out, per_group, atol=1e-5)


def test_one_weight_removed_first_is_made_up_for_as_least_squares_does(monkeypatch):
    """Zeroing the first column leaves every other weight free: the solver's update is then
    the least-squares refit of the rest, row by row (exact without damping)."""
    monkeypatch.setattr(module, "DAMP", 0.0)
    torch.manual_seed(0)
    X = torch.randn(400, 8) @ torch.randn(8, 8)  # correlated inputs: a removal can be made up
    W = torch.randn(3, 8)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, 0] = False
    new = module._solve(W, keep, module._damped(X.T @ X))
    assert bool((new[:, 0] == 0).all())
    target = X @ W.T
    refit = torch.linalg.lstsq(X[:, 1:].double(), target.double()).solution.T.float()
    assert torch.allclose(new[:, 1:], refit, atol=1e-3)
    masked = W.masked_fill(~keep, 0.0)
    assert ((X @ new.T - target) ** 2).mean() < 0.5 * ((X @ masked.T - target) ** 2).mean()


def test_the_refit_is_each_rows_least_squares_on_its_own_kept_columns(monkeypatch):
    """Rows keep different numbers of weights (padded systems) and some inputs are dead."""
    monkeypatch.setattr(module, "REFIT_MEMORY", 8 * 6 * 6 * 2)  # chunks of two rows
    monkeypatch.setattr(module, "DAMP", 0.0)
    torch.manual_seed(1)
    X = torch.randn(300, 7) @ torch.randn(7, 7)
    X[:, 3] = 0  # an input never active
    W = torch.randn(5, 7)
    keep = torch.rand(5, 7) > 0.4
    keep[0] = True
    keep[1, :] = False
    keep[1, 2] = True  # one weight kept
    new = module._refit(W, keep, module._damped((X.T @ X).double()))
    assert torch.equal(new != 0, keep)
    assert torch.allclose(new[keep[:, 3], 3], W[keep[:, 3], 3])  # a dead input's: as it was
    # inputs of 1e-20 (a random-init EfficientNet's deep layers): float32 would flush the
    # covariance to zero and call it singular; scaled first, the refit is the same
    tiny = module._refit(W, keep, module._damped((X.T @ X).double() * 1e-40))
    assert torch.allclose(tiny, new, atol=1e-5)
    for r in range(5):
        k = keep[r] & (torch.arange(7) != 3)
        best = torch.linalg.lstsq(X[:, k].double(), (X @ W[r]).double()).solution
        assert torch.allclose(new[r, k].double(), best, atol=1e-4), r


@pytest.fixture(scope="module")
def mlp():
    return trained_context({"data": {"source": "builtin:digits"},
                            "model": {"source": "builtin:mlp", "hidden": [128, 64]},
                            "train": {"epochs": 10, "early_stopping": None}})


def _pruned(model, ctx, amount=0.8, **options):
    prune = COMPRESSORS.get("prune")
    return prune.fn(model, prune.resolve({"amount": amount, "finetune_epochs": 0,
                                          **options}, "compress[0]"), ctx)


def test_reconstruction_keeps_the_magnitude_mask_and_recovers_accuracy(mlp):
    model, ctx = mlp
    plain = _pruned(model, ctx, method="magnitude", scope="layer").model
    rebuilt = _pruned(model, ctx, method="magnitude", reconstruct="obs", scope="layer")
    for (name, a), (_, b) in zip(plain.named_parameters(), rebuilt.model.named_parameters(),
                                 strict=True):
        if name.endswith("weight"):
            assert torch.equal(a == 0, b == 0), name  # the same zeros, other kept values
    acc_plain = ctx.evaluate(plain)["accuracy"]
    acc_rebuilt = ctx.evaluate(rebuilt.model)["accuracy"]
    print("digits 128-64 MLP, 80% per layer, no fine-tuning: magnitude", acc_plain,
          "+ OBS reconstruction", acc_rebuilt)
    assert acc_rebuilt > acc_plain + 0.03
    assert any("reconstructed 3 of 3 pruned layers" in n for n in rebuilt.notes)


def test_obs_chooses_its_own_zeros_keeps_the_sparsity_and_beats_magnitude(mlp):
    model, ctx = mlp
    obs = _pruned(model, ctx, method="obs", amount=0.9, scope="layer").model
    mag = _pruned(model, ctx, method="magnitude", amount=0.9, scope="layer").model
    for m in (m for m in obs.modules() if isinstance(m, nn.Linear)):
        assert int((m.weight == 0).sum()) == round(0.9 * m.weight.numel())
    differs = [not torch.equal(a.weight == 0, b.weight == 0) for a, b in
               zip(obs.modules(), mag.modules(), strict=True) if isinstance(a, nn.Linear)]
    assert any(differs)
    acc_obs, acc_mag = ctx.evaluate(obs)["accuracy"], ctx.evaluate(mag)["accuracy"]
    print("digits 128-64 MLP, 90% per layer, no fine-tuning: obs", acc_obs, "magnitude",
          acc_mag)
    assert acc_obs > acc_mag + 0.1


def test_a_graph_with_hidden_layer_types_says_it_was_not_reconstructed(mlp):
    model, ctx = mlp
    graph = torch.export.export(model, (ctx.tensors["X_test"][:2],)).module()
    result = _pruned(graph, ctx, method="magnitude", reconstruct="obs")
    assert any(n.startswith("Not reconstructed: this model's layer types are hidden")
               for n in result.notes)
    with pytest.raises(UserError, match="so obs pruning has no Linear or Conv layer"):
        _pruned(graph, ctx, method="obs")


def test_the_batched_solve_survives_onemkls_two_thread_bug():
    """torch's CPU build failed or hung on this batched solve with 2 threads
    (pytorch/pytorch#142815; test_real_models hung in it); the refit solves on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        A = torch.eye(151).unsqueeze(0).repeat(2, 1, 1).contiguous()
        x = module._solve_one_thread(A, torch.ones(2, 151, 1))
        assert torch.equal(x, torch.ones(2, 151, 1)) and torch.get_num_threads() == 2
        with pytest.raises(FloatingPointError):
            module._solve_one_thread(A * float("nan"), torch.ones(2, 151, 1))
    finally:
        torch.set_num_threads(threads)
