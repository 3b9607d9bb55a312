"""The harness every variant goes through: evaluated, sized and timed the same way.

`measure` evaluates a variant on every split and writes it to its own folder,
`DIR/<variant>/`: a PyTorch variant as a model bundle (`model.json` + `model.safetensors`,
what the engine reloads: `engine.bundle`), its compressed encoding `model.wbz` (whose size
is `size_bytes`) and its `.pt2` export; an ONNX Runtime variant as `runtime.onnx`; with
`export.onnx`, the deployable `model.onnx` (preprocessing inside) of either.
`time_variants` then times every variant of a run once, in the runtime it ships in, all in
the same alternating rounds at one thread (`latency.round_robin`), so each latency is one
measurement that every page, the report and `result.json` show, and each speedup is the
ratio of two figures shown, with its reference named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import deploy
from engine.bundle import save_bundle
from engine.compress import CompressContext, StepResult
from engine.compress.encode import encode
from engine.export import SessionModule, ort_call, ort_session
from engine.latency import THREADS, round_robin, torch_call
from engine.metrics import RETRIEVAL_K, cosine, outputs, retrieval_agreement, scores_of
from engine.models import complexity, save_model

BASELINE_REFERENCE = f"the baseline, PyTorch eager, {THREADS} thread"


@dataclass
class Measured:
    """A variant's record, and the calls that time it (and its ONNX float32 reference)."""

    variant: dict[str, Any]
    timer: Callable[[], Any]
    reference_timer: Callable[[], Any] | None = None


def measure(name: str, outcome: StepResult, ctx: CompressContext, folder: Path, *,
            chain: list[str], reference: dict[str, Any] | None, huffman: bool,
            technique: str | None = None) -> Measured:
    """Evaluate a variant and write what ships; `time_variants` times it later."""
    metrics: dict[str, Any] = {}
    reference_timer = None
    if outcome.runtime == "torch":
        model = outcome.model
        for part in ("train", "val"):
            metrics.update({f"{part}_{k}": v for k, v in ctx.evaluate(model, part).items()})
        test_out = outputs(model, ctx.tensors["X_test"]) if len(ctx.tensors["X_test"]) else None
        if test_out is not None:
            metrics.update({f"test_{k}": v for k, v in
                            scores_of(test_out, ctx.tensors["y_test"], ctx.task).items()})
        metrics.update(complexity(model, ctx.input_shape))
        here = folder / name
        metrics["bundle_bytes"] = save_bundle(
            model, here, input_spec=input_spec(ctx.data), output_spec=output_spec(ctx.data),
            compression=chain, extra=preprocess_tensors(ctx.data))
        blob = encode(model, huffman=huffman)
        (here / "model.wbz").write_bytes(blob)
        metrics["size_bytes"] = len(blob)
        metrics["pt2_bytes"] = save_model(model, ctx.input_shape, here / "model.pt2")
        model_file = name
        if reference is not None:
            metrics["size_ratio"] = reference["metrics"]["size_bytes"] / len(blob)
            metrics["size_reference"] = "the baseline's .wbz file"
        timer = torch_call(model, ctx.input_shape)
    else:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "runtime.onnx").write_bytes(outcome.onnx_bytes)
        metrics["size_bytes"] = len(outcome.onnx_bytes)
        model_file = f"{name}/runtime.onnx"
        counted = (complexity(outcome.source, ctx.input_shape) if outcome.source is not None
                   else reference["metrics"] if reference else {})  # the model it was made
        for key in ("params", "nonzero_params", "flops"):  # from (a pruned one, say)
            metrics[key] = counted.get(key)
        if outcome.metrics.get("reference_size_bytes"):
            metrics["size_ratio"] = (outcome.metrics["reference_size_bytes"]
                                     / metrics["size_bytes"])
            metrics["size_reference"] = "the same model as a float32 .onnx file"
        timer = ort_call(outcome.onnx_bytes, ctx.input_shape)
        test_out = (outputs(SessionModule(ort_session(outcome.onnx_bytes)), ctx.tensors["X_test"])
                    if len(ctx.tensors["X_test"]) and reports_fidelity(ctx) else None)
        if outcome.reference_onnx is not None:
            reference_timer = ort_call(outcome.reference_onnx, ctx.input_shape)
    metrics.update(outcome.metrics)
    if ctx.data.labels == "teacher":  # accuracy on the teacher's own labels is agreement,
        for part in ("train", "val", "test"):  # and so is the cosine to its output vectors
            for key in ("accuracy", "cosine"):
                if f"{part}_{key}" in metrics:
                    metrics[f"{part}_agreement"] = metrics.pop(f"{part}_{key}")
    if test_out is not None:
        metrics.update(fidelity(test_out, ctx, baseline=reference is None))
    metrics.update(runtime=outcome.runtime, chain=" -> ".join(chain) or "trained model",
                   notes=list(outcome.notes))
    if metrics.get("test_agreement", 1.0) < COLLAPSED:
        metrics["notes"].append(collapsed(name, metrics["test_agreement"], ctx.task))
    if ctx.export_onnx:
        metrics["deploy"] = _deploy(name, outcome, ctx, folder)
        base = (reference or {}).get("metrics", {}).get("deploy")
        if base and metrics["deploy"]["bytes"] >= 0.95 * base["bytes"]:
            metrics["notes"].append(onnx_not_smaller(name, metrics["deploy"]["bytes"],
                                                     base["bytes"]))
    variant = {"name": name, "technique": technique, "metrics": metrics,
               "history": outcome.history or {}, "model_file": model_file}
    return Measured(variant, timer, reference_timer)


def reports_fidelity(ctx: CompressContext) -> bool:
    """Whether `fidelity` has a figure for this run's variants (an ONNX Runtime variant's
    test outputs are computed again only then)."""
    return _embedder(ctx) if ctx.data.labels == "teacher" else ctx.n_out > 1


def _embedder(ctx: CompressContext) -> bool:
    """Whether the run scores vectors (an embedder's), whose neighbours can be compared."""
    y = ctx.tensors["y_test"]
    return ctx.task == "regression" and y.ndim == 2 and y.shape[1] > 1


def fidelity(out: torch.Tensor, ctx: CompressContext, *, baseline: bool) -> dict[str, float]:
    """How closely a variant's test outputs follow the baseline's, beside its accuracy: a
    variant can keep its accuracy while its answers or outputs drift (static int8 of an
    embedder kept accuracy 1.0 at cosine 0.42). With labels, `test_fidelity` is a
    classifier's top-1 agreement with the baseline's predictions (raw logits' cosine is
    blind to a flip: [5, 4.9] and [4.9, 5] are 0.9998 alike), or for vector outputs the
    mean cosine to the baseline's. Label-free, `test_agreement` says it already, and an
    embedder adds `test_retrieval_at_10`: the share of each test row's 10 nearest rows
    under the original embeddings that it still finds. Scalar outputs have neither."""
    if ctx.data.labels == "teacher":
        return ({f"test_retrieval_at_{RETRIEVAL_K}":
                 retrieval_agreement(out, ctx.tensors["y_test"])} if _embedder(ctx) else {})
    if out.ndim != 2 or out.shape[1] < 2:
        return {}
    if baseline or ctx.reference_outputs is None:
        ctx.reference_outputs = out
    if ctx.task == "classification":
        same = out.argmax(1) == ctx.reference_outputs.argmax(1)
        return {"test_fidelity": float(same.float().mean())}
    return {"test_fidelity": cosine(out, ctx.reference_outputs)}


def time_variants(measured: list[Measured]) -> None:
    """Time every variant (the first is the baseline) in the same rounds and fill in each
    one's latency, its speedup over the baseline and, for an ONNX Runtime variant, over the
    same model in ONNX Runtime float32; flag a variant that is smaller but not faster."""
    calls = {m.variant["name"]: m.timer for m in measured}
    calls.update({f"{m.variant['name']} (float32 reference)": m.reference_timer
                  for m in measured if m.reference_timer is not None})
    figures = round_robin(calls)
    base = figures[measured[0].variant["name"]]["median_ms"]
    for i, m in enumerate(measured):
        name, metrics = m.variant["name"], m.variant["metrics"]
        figure = figures[name]
        metrics.update(latency_ms=figure["median_ms"], latency_p95_ms=figure["p95_ms"],
                       latency_threads=figure["threads"], latency_calls=figure["calls"])
        if i == 0:
            continue
        metrics["speedup"] = base / figure["median_ms"]
        metrics["speedup_reference"] = BASELINE_REFERENCE
        if m.reference_timer is not None:
            fp32 = figures[f"{name} (float32 reference)"]["median_ms"]
            metrics["speedup_vs_onnx_fp32"] = fp32 / figure["median_ms"]
            if metrics["speedup_vs_onnx_fp32"] < 1.05:
                metrics["notes"].append(
                    f"{name} runs at {metrics['speedup_vs_onnx_fp32']:.2f}x the speed of the "
                    f"same model in ONNX Runtime float32: this CPU's int8 kernels do not beat "
                    f"its float ones at batch 1.")
        if metrics.get("size_ratio", 0) >= 1.2 and metrics["speedup"] < 1.05:
            metrics["smaller_not_faster"] = True
            metrics["notes"].append(
                f"{name} is {metrics['size_ratio']:.1f}x smaller but not faster "
                f"({metrics['speedup']:.2f}x the speed of {BASELINE_REFERENCE}): the "
                f"arithmetic it runs did not shrink.")


def _deploy(name: str, outcome: StepResult, ctx: CompressContext,
            folder: Path) -> dict[str, Any]:
    """The deployable .onnx (preprocessing inside) and ONNX Runtime's view of it."""
    if outcome.runtime == "torch":
        file = deploy.export_model(outcome.model, ctx.data, name=name)
        # its batch-1 PyTorch latency is the variant's latency_ms, measured once, in the
        # harness's rounds: the export adds only throughput at a batch
        info = deploy.report(file, ctx.data, model=outcome.model, torch_batch1=False)
    else:
        file = deploy.with_preprocessing(outcome.onnx_bytes, ctx.data)
        info = deploy.report(file, ctx.data)
    (folder / name / "model.onnx").write_bytes(file)
    return {**info, "file": f"{name}/model.onnx"}


COLLAPSED = 0.5  # a label-free variant below this agreement has lost the original's behaviour


def collapsed(name: str, agreement: float, task: str) -> str:
    """A variant that no longer behaves like the original model, in one sentence."""
    if task == "classification":
        figure = (f"its top-1 predictions match the original's on only {agreement:.0%} of "
                  f"the test rows")
    else:
        figure = f"its outputs' mean cosine similarity to the original's is only {agreement:.2f}"
    return (f"{name} has collapsed: {figure}; fine-tune it longer, or compress less (a "
            f"smaller amount, more bits, a larger rank).")


def onnx_not_smaller(name: str, size: int, baseline: int) -> str:
    """Why a variant's ONNX file is no smaller than the baseline's, in one sentence."""
    return (f"{name}'s ONNX file is {size:,} bytes, no smaller than the baseline's "
            f"{baseline:,}: ONNX Runtime keeps every weight as a dense tensor, so the zeros "
            f"of unstructured pruning save bytes only in the bundle's encoding (model.wbz, "
            f"size_bytes); structured pruning, sharing, k-bit, fp16 and static_int8 are what "
            f"make the ONNX file smaller.")


def input_spec(data: Any) -> dict[str, Any]:
    """What a bundle says about its input: the sample shape, and the fitted preprocessing
    (its arrays are `preprocess.*` tensors in model.safetensors)."""
    pre = data.preprocess
    return {"shape": list(data.input_shape), "is_image": data.is_image,
            "features": data.feature_names, "raw_features": data.n_raw_features,
            "encoding": data.encoding, "source": data.source,
            "preprocessing": {"feature_selection": pre.keep is not None,
                              "scaling": "(x - preprocess.shift) / preprocess.scale"
                              if pre.shift is not None else None}}


def output_spec(data: Any) -> dict[str, Any]:
    return {"task": data.task, "n_out": data.n_outputs, "classes": data.class_names}


def preprocess_tensors(data: Any) -> dict[str, Any]:
    pre = data.preprocess
    return {f"preprocess.{k}": v for k in ("keep", "shift", "scale")
            if (v := getattr(pre, k)) is not None}
