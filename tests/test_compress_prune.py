"""Pruning: exact sparsity kept through fine-tuning, removal equal to masking, schedules."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import engine.compress.prune  # noqa: F401 - registers "prune"
from engine.compress import COMPRESSORS, CompressContext, StepResult
from engine.compress.channels import structured_prune
from engine.compress.prune import cubic_schedule, magnitude_mask, spared, sparsity
from engine.errors import UserError
from engine.models import build_model
from engine.recipe import ModelConfig
from tests.helpers import trained_context


def _baseline(source: str, **model: object) -> tuple[nn.Module, CompressContext]:
    """A model trained briefly on digits and the context a technique gets in a run."""
    return trained_context({"data": {"source": "builtin:digits"},
                            "model": {"source": f"builtin:{source}", "hidden": [64, 32],
                                      **model},
                            "train": {"epochs": 8, "early_stopping": None}})


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, CompressContext]:
    return _baseline("mlp")


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, CompressContext]:
    return _baseline("cnn", channels=[8, 16])


def run(model: nn.Module, ctx: CompressContext, **options: object) -> StepResult:
    entry = COMPRESSORS.get("prune")
    return entry.fn(model, entry.resolve(options, "compress[0]"), ctx)


def layer_zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(zeros, size) of each Linear/Conv weight."""
    return {n: (int((m.weight == 0).sum()), m.weight.numel()) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def masked_copy(model: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """The original with the removed neurons' weights and biases set to zero."""
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in kept.items():
            layer = masked.get_submodule(name)
            gone = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            gone[keep] = False
            layer.weight[gone] = 0
            layer.bias[gone] = 0
    return masked


@pytest.mark.parametrize("options", [
    {"method": "magnitude"}, {"method": "random", "scope": "global"},
    {"method": "obd", "curvature": "fisher"}, {"method": "obd", "curvature": "hessian"},
    {"method": "obs"}, {"method": "magnitude", "reconstruct": "obs"}, {"method": "structured"},
    {"method": "magnitude", "schedule": "gradual", "steps": 2},
], ids=lambda o: "-".join(map(str, o.values())))
def test_returns_a_new_model_and_leaves_the_input_unchanged(mlp, options):
    model, ctx = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, ctx, amount=0.5, finetune_epochs=1, **options)
    assert result.model is not model
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.history is not None and result.history["epoch"][-1] >= 1


@pytest.mark.parametrize("method,curvature", [("magnitude", "fisher"), ("random", "fisher"),
                                              ("obd", "fisher"), ("obd", "hessian"),
                                              ("obs", "fisher")])
@pytest.mark.parametrize("scope", ["layer", "global", "lamp"])
def test_sparsity_equals_the_amount_and_survives_fine_tuning(mlp, method, curvature, scope):
    model, ctx = mlp
    events: list[dict] = []
    ctx = dataclasses.replace(ctx, on_progress=events.append)
    result = run(model, ctx, method=method, curvature=curvature, scope=scope, amount=0.7,
                 finetune_epochs=2)
    zeros = layer_zeros(result.model)
    if scope == "layer":
        assert all(z == round(0.7 * n) for z, n in zeros.values()), zeros
    else:
        total = sum(n for _, n in zeros.values())
        assert sum(z for z, _ in zeros.values()) == round(0.7 * total)
    assert sparsity(result.model) == pytest.approx(0.7, abs=1e-3)
    # plain dense tensors: no weight_orig/weight_mask reparametrization left behind
    assert result.model.state_dict().keys() == model.state_dict().keys()
    assert not any(m._forward_pre_hooks for m in result.model.modules())
    # the biases were not pruned, and the notes say so
    assert all(int((m.bias == 0).sum()) == 0 for m in result.model.modules()
               if isinstance(m, nn.Linear))
    assert any("Not pruned" in note and "fc1.bias" in note for note in result.notes)
    assert len(result.history["epoch"]) == 2
    assert events and all(e["variant"] == "prune" for e in events)


@pytest.mark.parametrize("method,curvature", [("magnitude", "fisher"), ("obd", "fisher"),
                                              ("obd", "hessian")])
def test_conv_kernels_are_pruned_too(cnn, method, curvature):
    model, ctx = cnn
    result = run(model, ctx, method=method, curvature=curvature, amount=0.6, finetune_epochs=1,
                 spare="none", scope="layer")
    zeros = layer_zeros(result.model)
    assert {"conv1", "conv2", "out"} <= zeros.keys()
    assert all(z == round(0.6 * n) for z, n in zeros.values()), zeros


def test_a_convolutional_networks_sensitive_layers_are_spared_unless_asked(cnn):
    """spare: auto keeps the stem (it sees raw pixels), the classifier and any depthwise
    convolution whole on a CNN, and says so; the layers between lose the amount."""
    model, ctx = cnn
    result = run(model, ctx, amount=0.6, finetune_epochs=0, scope="layer")
    zeros = layer_zeros(result.model)
    assert zeros["conv1"][0] == zeros["out"][0] == 0
    middle = {k: v for k, v in zeros.items() if k not in ("conv1", "out")}
    assert middle and all(z == round(0.6 * n) for z, n in middle.values()), zeros
    assert any("Kept whole as sensitive" in n and "conv1" in n for n in result.notes)
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8),
                              nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(2))
    depthwise(torch.zeros(1, 3, 8, 8))
    assert spared(depthwise, "auto") == ["0.weight", "1.weight", "4.weight"]
    assert spared(depthwise, "none") == []
    assert spared(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "auto") == []  # an MLP


def test_global_scope_prunes_layers_unevenly(mlp):
    model, ctx = mlp
    zeros = layer_zeros(run(model, ctx, scope="global", amount=0.8, finetune_epochs=0).model)
    fractions = [z / n for z, n in zeros.values()]
    assert max(fractions) - min(fractions) > 0.05, fractions


def test_lamp_ignores_a_layers_scale_and_never_empties_one(cnn):
    """LAMP's threshold is the same for a layer scaled by 1000 (a BatchNorm after it would
    undo the scale), where global magnitude empties the small layer; scores follow the
    paper's definition: w_u^2 over the sum of w_v^2 for |w_v| >= |w_u|."""
    from engine.compress.prune import lamp_scores

    w = torch.tensor([3.0, -1.0, 2.0, -math.inf])
    assert lamp_scores(w).tolist() == pytest.approx([1.0, 1 / 14, 4 / 13, -math.inf])
    model, ctx = cnn
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.conv2.weight.mul_(1e-3)
    for scope, same in [("lamp", True), ("global", False)]:
        zeros = [layer_zeros(run(m, ctx, scope=scope, amount=0.7, finetune_epochs=0,
                                 spare="none", correct="none").model) for m in (model, scaled)]
        assert (zeros[0] == zeros[1]) is same, (scope, zeros)
        if scope == "global":
            assert zeros[1]["conv2"][0] == zeros[1]["conv2"][1]  # emptied
        assert all(z < n for z, n in zeros[0].values())


def test_every_criterion_beats_random_before_fine_tuning(mlp):
    model, ctx = mlp
    acc = {f"{m}-{c}": ctx.evaluate(run(model, ctx, method=m, curvature=c, scope="global",
                                        amount=0.5, finetune_epochs=0).model)["accuracy"]
           for m, c in [("magnitude", "fisher"), ("obd", "fisher"), ("obd", "hessian"),
                        ("random", "fisher")]}
    print("digits mlp, 50% pruned globally, no fine-tuning:", acc)
    assert min(acc[k] for k in acc if not k.startswith("random")) > acc["random-fisher"] + 0.2


def test_magnitude_at_90_percent_keeps_accuracy_after_fine_tuning():
    # wider than the fixture's 64-32: at 90% per layer, the 10x32 output layer would keep
    # 3 weights per class; Han et al.'s 90%+ results are on nets with this much redundancy.
    # The default scope, lamp, ends 0.3 to 0.8 points down on LeNet-300-100 after 20 epochs
    # over three seeds (README, "Pruning's defaults"); here a quicker check of the same path
    model, ctx = _baseline("mlp", hidden=[256, 128])
    base = ctx.evaluate(model)["accuracy"]
    raw = ctx.evaluate(run(model, ctx, amount=0.9, finetune_epochs=0).model)["accuracy"]
    tuned = run(model, ctx, amount=0.9, finetune_epochs=10).model
    acc = ctx.evaluate(tuned)["accuracy"]
    print(f"digits mlp test accuracy: baseline {base:.3f}, 90% magnitude-pruned {raw:.3f}, "
          f"after 10 fine-tuning epochs {acc:.3f} (sparsity {sparsity(tuned):.3f})")
    assert sparsity(tuned) == pytest.approx(0.9, abs=1e-3)
    assert acc >= base - 0.04


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_structured_removal_equals_masking(arch, request):
    model, ctx = request.getfixturevalue(arch)
    result = run(model, ctx, method="structured", amount=0.5, norm="l2", finetune_epochs=0,
                 correct="none")  # removal alone: correction would move the output
    smaller = result.model
    _, kept = structured_prune(model, 0.5, "l2")
    hidden = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    assert list(kept) == hidden
    assert [n for n, _ in smaller.named_children()] == [n for n, _ in model.named_children()]
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel()
                                                              for p in model.parameters())
    for name, keep in kept.items():
        width = model.get_submodule(name).weight.shape[0]
        assert smaller.get_submodule(name).weight.shape[0] == len(keep) == width - width // 2
    assert smaller.get_submodule("out").weight.shape[0] == ctx.n_out
    # the first layer sees every input, so its ranking is the plain norm of its rows
    first = model.get_submodule(hidden[0]).weight.detach().flatten(1).norm(dim=1)
    assert set(kept[hidden[0]].tolist()) == set(first.topk(len(kept[hidden[0]])).indices.tolist())
    X = ctx.tensors["X_test"]
    with torch.no_grad():
        torch.testing.assert_close(smaller(X), masked_copy(model, kept)(X), atol=1e-5, rtol=0)
    assert any("→" in note for note in result.notes)


def test_structured_removal_equals_masking_with_a_sigmoid():
    """A masked sigmoid neuron still emits 0.5: its contribution moves into the next bias."""
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(20, 10), activation="sigmoid"),
                        (12,), 3, seed=0)
    smaller, kept = structured_prune(model, 0.6, "l1")
    X = torch.randn(50, 12)
    with torch.no_grad():
        torch.testing.assert_close(smaller(X), masked_copy(model, kept)(X), atol=1e-5, rtol=0)


def test_structured_keeps_at_least_one_neuron_and_fine_tunes(mlp):
    model, ctx = mlp
    result = run(model, ctx, method="structured", amount=0.99, finetune_epochs=1)
    assert result.model.fc2.weight.shape == (1, 1)
    assert result.model.out.weight.shape == (ctx.n_out, 1)
    assert result.history["epoch"] == [1]


def test_structured_gradual_reaches_the_oneshot_widths(cnn):
    model, ctx = cnn
    result = run(model, ctx, method="structured", schedule="gradual", steps=3, amount=0.75,
                 finetune_epochs=3)
    widths = [m.weight.shape[0] for m in result.model.children()
              if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert widths == [2, 4, 16, 8, ctx.n_out]
    assert result.history["epoch"] == [1, 2, 3]


def test_structured_on_logreg_has_nothing_to_remove(mlp):
    _, ctx = mlp
    model = build_model(ModelConfig(source="builtin:logreg"), ctx.input_shape, ctx.n_out, seed=0)
    result = run(model, ctx, method="structured")
    assert result.model is not model
    assert torch.equal(result.model.out.weight, model.out.weight)
    assert "nothing to remove" in result.notes[0]


def test_structured_refuses_a_flat_graph_but_magnitude_prunes_it(mlp):
    model, ctx = mlp
    graph = torch.export.export(model, (ctx.tensors["X_test"][:2],)).module()
    with pytest.raises(UserError, match="structured pruning has no Linear or Conv layer"):
        run(graph, ctx, method="structured")
    result = run(graph, ctx, amount=0.6, finetune_epochs=0)
    assert sparsity(result.model) == pytest.approx(0.6, abs=1e-3)
    assert sparsity(graph) == 0


def test_cubic_schedule():
    s = cubic_schedule(0.8, 4)
    assert s == pytest.approx([0.8 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)])
    assert s[-1] == pytest.approx(0.8) and s == sorted(s)
    assert s[0] > 0.8 / 4  # front-loaded: most weights go while the network is redundant
    assert cubic_schedule(0.5, 1) == [0.5]


def test_fine_tuning_epochs_are_spread_over_the_steps():
    from engine.compress.prune import _spread

    assert _spread(5, 4) == [1, 1, 1, 2]  # the remainder goes to the final sparsity
    assert _spread(2, 4) == [1, 1, 1, 1]  # at least one epoch per step
    assert _spread(0, 3) == [0, 0, 0]
    assert _spread(7, 1) == [7]


def test_gradual_follows_the_cubic_schedule(mlp):
    model, ctx = mlp
    seen: list[tuple[float, int]] = []
    ctx = dataclasses.replace(ctx)
    finetune = ctx.finetune

    def recording(net, epochs, **kw):
        seen.append((sparsity(net), epochs))
        return finetune(net, epochs, **kw)
    ctx.finetune = recording
    result = run(model, ctx, schedule="gradual", steps=4, amount=0.8, finetune_epochs=5,
                 scope="layer")
    assert [s for s, _ in seen] == pytest.approx(cubic_schedule(0.8, 4), abs=2e-3)
    assert [e for _, e in seen] == [1, 1, 1, 2]
    assert result.history["epoch"] == [1, 2, 3, 4, 5]
    assert result.history["time_s"] == sorted(result.history["time_s"])
    assert all(z == round(0.8 * n) for z, n in layer_zeros(result.model).values())


def test_magnitude_mask_and_sparsity_helpers():
    w = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, True], [True, False, False]]
    assert magnitude_mask(w, 0.0).all()
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.masked_fill_(~magnitude_mask(net[0].weight, 0.5), 0)
    assert sparsity(net) == pytest.approx(3 / 8)


def test_registry_refuses_bad_settings():
    entry = COMPRESSORS.get("prune")
    with pytest.raises(UserError, match="method"):
        entry.resolve({"method": "lottery"}, "compress[0]")
    with pytest.raises(UserError, match="amount"):
        entry.resolve({"amount": 1.0}, "compress[0]")
    assert entry.resolve({}, "compress[0]")["amount"] == 0.8


@pytest.mark.slow
def test_obd_beats_random_pruning_at_half_and_nine_tenths_with_and_without_fine_tuning():
    """The control every criterion must beat (issue 18: OBD at 90% with fine-tuning used to
    end 10 points below random pruning on this MLP)."""
    from tests.helpers import trained_context

    model, ctx = trained_context({"data": {"source": "builtin:digits"},
                                  "model": {"source": "builtin:mlp", "hidden": [256, 128]},
                                  "train": {"epochs": 15, "early_stopping": None}})
    prune = COMPRESSORS.get("prune")

    def accuracy(method: str, amount: float, epochs: int) -> float:
        step = prune.resolve({"method": method, "amount": amount, "scope": "layer",
                              "finetune_epochs": epochs}, "compress[0]")
        return ctx.evaluate(prune.fn(model, step, ctx).model)["accuracy"]

    for amount, epochs in ((0.5, 0), (0.9, 0), (0.9, 10)):
        obd, rand = accuracy("obd", amount, epochs), accuracy("random", amount, epochs)
        assert obd > rand + 0.02, (amount, epochs, obd, rand)
    # at half, fine-tuning brings every criterion back to the baseline: a tie
    assert accuracy("obd", 0.5, 10) >= accuracy("random", 0.5, 10) - 0.01


def test_fisher_one_example_at_a_time_equals_the_vectorized_one(cnn, monkeypatch):
    """Large samples take plain backward passes (vmap peaked at 6 GB on a 224 px CNN even one
    photo at a time); both give the same mean of squared per-example gradients."""
    from engine.compress import curvature as module
    from engine.compress.prune import _weights

    model, ctx = cnn
    named = _weights(model)
    vectorized = module.curvature(model, named, "fisher", ctx)
    monkeypatch.setattr(module, "LOOP_BELOW", 10**9)
    looped = module.curvature(model, named, "fisher", ctx)
    for a, b in zip(vectorized, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_structured_pruning_mentions_the_scope_only_when_one_was_chosen(mlp):
    model, ctx = mlp
    said = [" ".join(run(model, ctx, method="structured", amount=0.5, finetune_epochs=0,
                         **extra).notes) for extra in ({}, {"scope": "global"})]
    assert "scope setting" not in said[0]  # the default: nothing was asked, nothing to say
    assert "scope setting applies to unstructured methods only" in said[1]
