"""Quantization: every method copies, k-bit grids hold, zeros survive, int8 ONNX files are
small and accurate, QAT recovers accuracy, and the ONNX export matches PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from engine.compress import COMPRESSORS, CompressContext, StepResult
from engine.compress.quantize import METHODS, ONNX_METHODS
from engine.errors import UserError
from engine.export import ort_predict, ort_session
from engine.models import build_model, load_model, save_model
from engine.quantizers import quantize_tensor
from tests.helpers import trained_context

FLOAT32_WEIGHT_BYTES = 17_226 * 4  # the digits MLP 64-128-64-10 as raw float32


make_context = trained_context


def run(model: nn.Module, ctx: CompressContext, **options) -> StepResult:
    entry = COMPRESSORS.get("quantize")
    return entry.fn(model, entry.resolve(options, "compress[0]"), ctx)


def distinct_per_row(w: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1))


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, CompressContext]:
    return make_context({"data": {"source": "builtin:digits"},
                         "model": {"source": "builtin:mlp", "hidden": [128, 64]},
                         "train": {"epochs": 10, "early_stopping": None}})


@pytest.fixture(scope="module")
def results(digits) -> tuple[dict[str, torch.Tensor], dict[str, StepResult]]:
    """Every method once at its defaults (4 bits for the k-bit ones), and the input's
    state before any of them ran."""
    model, ctx = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {m: run(model, ctx, method=m, **({"bits": 4} if m in ("uniform", "log", "qat")
                                           else {}))
           for m in METHODS}
    return before, out


@pytest.mark.parametrize("method", METHODS)
def test_each_method_copies_and_leaves_the_input_alone(digits, results, method):
    model, _ = digits
    before, out = results
    result = out[method]
    if method in ONNX_METHODS:
        assert result.model is None and result.runtime == "onnxruntime" and result.onnx_bytes
    else:
        assert result.model is not model and result.runtime == "torch"
        assert all(p is not q for p, q in zip(result.model.parameters(), model.parameters(),
                                              strict=True))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.notes


@pytest.mark.parametrize("scheme", ["uniform", "log"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_tensor_keeps_at_most_2_to_the_k_values(scheme, per_channel, bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn((32, 4, 3, 3), generator=gen) * torch.logspace(-3, 0, 32)[:, None, None,
                                                                              None]
    w[w.abs() < 0.05 * w.abs().amax()] = 0.0  # pruned entries
    original = w.clone()
    q = quantize_tensor(w, bits, scheme, per_channel)
    assert torch.equal(w, original)  # pure
    assert q.shape == w.shape and q.dtype == w.dtype
    counted = distinct_per_row(q) if per_channel else len(torch.unique(q))
    assert counted <= 2 ** bits
    assert torch.all(q[w == 0] == 0)
    if scheme == "log":
        nz = q[q != 0].abs()
        assert torch.equal(torch.exp2(torch.round(torch.log2(nz))), nz)  # powers of two


def test_uniform_8_bit_is_close_and_zero_rows_survive():
    w = torch.randn(16, 40)
    w[3] = 0.0
    q = quantize_tensor(w, 8)
    step = (w.amax(1) - w.amin(1)) / 255
    assert torch.all((q - w).abs() <= step[:, None] * 0.5 + 1e-6)
    assert torch.all(q[3] == 0)
    with pytest.raises(ValueError, match="scheme"):
        quantize_tensor(w, 4, "kmeans")


@pytest.mark.parametrize("method", ["uniform", "log", "qat"])
def test_k_bit_methods_hold_on_every_layer(results, method):
    model = results[1][method].model
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert distinct_per_row(p.detach()) <= 2 ** 4, name


def test_per_tensor_grid_on_the_model(digits):
    model, ctx = digits
    out = run(model, ctx, method="uniform", bits=3, per_channel=False, finetune_epochs=0)
    for name, p in out.model.named_parameters():
        if name.endswith("weight"):
            assert len(torch.unique(p.detach())) <= 8, name


def test_pruned_zeros_survive_every_method(digits):
    model, ctx = digits
    pruned = build_model(ctx.model_cfg, ctx.input_shape, ctx.n_out, seed=0)
    pruned.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if name.endswith("weight"):
                p[p.abs() < p.abs().median()] = 0.0
    zeros = {n: p.detach() == 0 for n, p in pruned.named_parameters() if n.endswith("weight")}
    for options in ({"method": "fp16"}, {"method": "uniform", "bits": 3, "finetune_epochs": 0},
                    {"method": "log", "bits": 3, "per_channel": False, "finetune_epochs": 1},
                    {"method": "qat", "bits": 4, "finetune_epochs": 1}):
        out = run(pruned, ctx, **options).model
        params = dict(out.named_parameters())
        for name, mask in zeros.items():
            assert torch.all(params[name][mask] == 0), (options, name)

    import onnx
    from onnx import numpy_helper

    int8 = run(pruned, ctx, method="static_int8")
    weights = [numpy_helper.to_array(t) for t in onnx.load_from_string(int8.onnx_bytes)
               .graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert sum(int((w == 0).sum()) for w in weights) >= sum(int(m.sum())
                                                            for m in zeros.values())


def test_fp16_values_are_exact_and_accuracy_barely_moves(digits, results):
    model, ctx = digits
    out = results[1]["fp16"].model
    for p in out.parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, p.half().float())
    before, after = ctx.evaluate(model)["accuracy"], ctx.evaluate(out)["accuracy"]
    print(f"\nfp16: accuracy {before:.4f} -> {after:.4f}")
    assert abs(after - before) <= 0.005


@pytest.mark.parametrize("method", ONNX_METHODS)
def test_int8_onnx_is_valid_accurate_and_small(digits, results, method):
    import onnx

    model, ctx = digits
    result = results[1][method]
    onnx.checker.check_model(onnx.load_from_string(result.onnx_bytes), full_check=True)
    m = result.metrics
    for key in ("test_loss", "test_accuracy", "reference_size_bytes"):
        assert key in m and np.isfinite(m[key]), key
    assert "latency_ms" not in m  # the runner's harness times every variant, once
    assert len(result.reference_onnx) == m["reference_size_bytes"]  # timed beside it
    float_acc = ctx.evaluate(model)["accuracy"]
    size = len(result.onnx_bytes)
    print(f"\n{method}: accuracy {float_acc:.4f} -> {m['test_accuracy']:.4f}; "
          f"{size:,} bytes vs {m['reference_size_bytes']:,} float32 ONNX "
          f"({m['reference_size_bytes'] / size:.2f}x) and {FLOAT32_WEIGHT_BYTES:,} raw float32 "
          f"weights ({FLOAT32_WEIGHT_BYTES / size:.2f}x)")
    assert abs(m["test_accuracy"] - float_acc) <= 0.01
    assert size * 3 < m["reference_size_bytes"]
    session = ort_session(result.onnx_bytes)
    assert ort_predict(session, ctx.tensors["X_test"][:7].numpy()).shape == (7, 10)


def test_int8_per_tensor_meets_the_size_target(digits):
    model, ctx = digits
    result = run(model, ctx, method="static_int8", per_channel=False)
    size = len(result.onnx_bytes)
    print(f"\nstatic_int8 per tensor: {size:,} bytes, {FLOAT32_WEIGHT_BYTES / size:.2f}x smaller "
          f"than the raw float32 weights")
    assert FLOAT32_WEIGHT_BYTES / size >= 3.5


def test_qat_recovers_accuracy_and_bakes_a_plain_model(digits, results):
    model, ctx = digits
    qat = results[1]["qat"]
    plain = run(model, ctx, method="uniform", bits=4, finetune_epochs=0, correct="none")
    acc_qat = ctx.evaluate(qat.model)["accuracy"]
    acc_plain = ctx.evaluate(plain.model)["accuracy"]
    print(f"\n4-bit: uniform rounded alone {acc_plain:.4f}, qat {acc_qat:.4f} "
          f"(float {ctx.evaluate(model)['accuracy']:.4f})")
    assert acc_qat >= acc_plain
    assert qat.history and len(qat.history["epoch"]) == 3

    baked = qat.model
    names = [n for n, _ in baked.named_parameters()]
    assert {"fc1.weight", "fc2.weight", "out.weight"} <= set(names)
    assert all(p.requires_grad for p in baked.parameters())
    assert {type(m) for m in baked.modules()} <= {nn.Sequential, nn.Flatten, nn.Linear,
                                                   nn.ReLU, type(baked.fc1_input_quant)}
    quantizers = [m for m in baked.modules() if type(m).__name__ == "ActivationFakeQuant"]
    assert len(quantizers) == 3 and all(q.frozen for q in quantizers)
    x = ctx.tensors["X_test"][:7]
    scales = [q.scale.clone() for q in quantizers]
    baked.train()
    baked(x)  # frozen: training mode no longer moves the ranges
    baked.eval()
    assert all(torch.equal(s, q.scale) for s, q in zip(scales, quantizers, strict=True))
    from engine.export import onnx_bytes

    session = ort_session(onnx_bytes(baked, ctx.input_shape))
    np.testing.assert_allclose(ort_predict(session, x.numpy()), baked(x).detach().numpy(),
                               atol=1e-4)


@pytest.mark.parametrize("source", ["builtin", "pt2"])
def test_onnx_export_matches_pytorch_at_any_batch(digits, tmp_path, source):
    import onnx

    from engine.export import onnx_bytes

    model, ctx = digits
    if source == "pt2":
        save_model(model, ctx.input_shape, tmp_path / "m.pt2")
        cfg = dataclasses.replace(ctx.model_cfg, source=str(tmp_path / "m.pt2"))
        model = load_model(cfg, ctx.input_shape, ctx.n_out)
        # an uploaded graph is unflattened: its Linear layers are there to quantize
        quantized = run(model, ctx, method="uniform", bits=4).model
        layers = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
        assert layers and all(distinct_per_row(m.weight) <= 16 for m in layers)
    data = onnx_bytes(model, ctx.input_shape)
    proto = onnx.load_from_string(data)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    session = ort_session(data, threads=1)
    for batch in (1, 7):
        x = ctx.tensors["X_test"][:batch]
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(ort_predict(session, x.numpy()), expected, atol=1e-4,
                                   rtol=1e-4)


def test_regression_static_int8_reports_r2():
    model, ctx = make_context({"data": {"source": "builtin:diabetes"},
                               "model": {"source": "builtin:logreg"},
                               # raw targets in the hundreds: a large rate to converge
                               "train": {"epochs": 100, "lr": 2.0, "early_stopping": None}})
    result = run(model, ctx, method="static_int8", calibration_rows=64)
    m = result.metrics
    assert {"test_loss", "test_mse", "test_r2"} <= set(m)
    float_r2 = ctx.evaluate(model)["r2"]
    print(f"\ndiabetes logreg: r2 {float_r2:.4f} -> {m['test_r2']:.4f} (static_int8)")
    assert float_r2 > 0.2 and abs(m["test_r2"] - float_r2) < 0.05


def test_registry_entry():
    entry = COMPRESSORS.get("quantize")
    assert entry.defaults() == {"method": "static_int8", "bits": 8, "layer_bits": {},
                                "per_channel": True,
                                "calibration_rows": 512, "finetune_epochs": 3,
                                "correct": "stats"}
    assert set(entry.extra["terminal_methods"]) == set(ONNX_METHODS)
    with pytest.raises(UserError):
        entry.resolve({"method": "int4"}, "compress[0]")
    with pytest.raises(UserError):
        entry.resolve({"bits": 1}, "compress[0]")
