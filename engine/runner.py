"""`engine.resolve` and `engine.run`: a recipe checked, then a trained model and a result.

`resolve` is the registry-aware step above the schema: the sections' names looked up and
their defaults filled (`engine.sections`), the compression chain checked
(`engine.compress.resolve_chain`) and the tune section (`engine.tune.validate_tune`). The
CLI, `jobs.submit` and the pages call it, and `run` calls it on what it is given.

The result follows DESIGN.md: the recipe with every default filled in, the device, and one
record per variant (only the baseline until compression steps exist) with its metrics and
per-epoch history. With `out_dir` the result is written to `out_dir/result.json` and each
variant's model to `out_dir/<variant>.pt2`; `size_bytes` is that file's size.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.autocompress import VARIANT, autocompress, budget_text, finish, validate_autocompress
from engine.compress import (
    COMPRESSORS,
    CompressContext,
    StepResult,
    describe_step,
    resolve_chain,
    run_chain,
    step_name,
)
from engine.compress.onnx_int8 import quantize_onnx
from engine.compress.sensitivity import sensitivity
from engine.data import DATASETS, load_data
from engine.diagnostics.run import run_diagnostics
from engine.errors import UserError
from engine.executor import Executor
from engine.export import SessionModule, ort_call, ort_session
from engine.hf_text import is_text_folder
from engine.latency import THREADS, machine, round_robin
from engine.measure import Measured, fidelity, measure, time_variants
from engine.metrics import in_model_space, outputs, relabel, scores_of
from engine.models import (
    MODELS,
    build_model,
    onnx_complexity,
    onnx_output_width,
    own_outputs,
    read_onnx,
)
from engine.optimizers import OPTIMIZERS
from engine.recipe import Recipe, as_recipe
from engine.registry import Registry
from engine.regularization import REGULARIZERS
from engine.schedules import SCHEDULES
from engine.sections import resolve_sections
from engine.settings import store_url
from engine.train import ProgressFn, fit_fresh, resolve_device, to_tensors
from engine.tune import best_recipe, search, validate_tune


class TrainingDivergedError(UserError):
    """Training stopped on a NaN or infinite loss; `result` keeps the history so far."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def registries() -> dict[str, Registry]:
    """Every registry by its plural name: datasets, models, optimizers, schedules,
    regularizers, compression."""
    return {r.kind: r for r in (DATASETS, MODELS, OPTIMIZERS, SCHEDULES, REGULARIZERS,
                                COMPRESSORS)}


def resolve(recipe: Recipe | dict[str, Any] | str | Path) -> Recipe:
    """The recipe (a Recipe, a dict or a path) checked against the registries, with every
    default filled in; idempotent. A UserError names the key and the fix."""
    recipe = resolve_sections(as_recipe(recipe))
    tune = validate_tune(recipe.tune) if recipe.tune is not None else None
    auto = (validate_autocompress(recipe.autocompress) if recipe.autocompress is not None
            else None)
    return recipe.replace(compress=resolve_chain(recipe.compress), tune=tune,
                          autocompress=auto)


def run(recipe: Recipe | dict[str, Any] | str | Path, *, out_dir: str | Path | None = None,
        on_progress: ProgressFn | None = None, storage: str | None = None,
        executor: Executor | None = None) -> dict[str, Any]:
    """Run a recipe end to end and return its result (see DESIGN.md for the keys).

    A search (the recipe's `tune` section) keeps its study in `storage` (an SQLAlchemy
    URL; the run store's database when None) and runs parallel trials on `executor`
    (local processes when None)."""
    recipe = resolve(recipe)
    emit = on_progress or (lambda event: None)
    asked, tuning = recipe, None
    if recipe.tune is not None:  # search first, then the run trains the winner
        emit({"event": "stage", "stage": "tune", "message": "searching hyperparameters"})
        tuning = search(recipe, storage=storage or store_url(), executor=executor,
                        on_trial=lambda trial: emit({"event": "trial", **trial}))
        recipe = best_recipe(recipe, tuning)
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    emit({"event": "stage", "stage": "data", "message": "loading the data"})
    data = load_data(recipe.data, seed=recipe.seed, model_source=recipe.model.source)
    if recipe.data.labels == "teacher":  # the original model's predictions are the labels
        width, names = own_outputs(recipe.model, data.input_shape)
        data = relabel(data, build_model(recipe.model, data.input_shape, width,
                                         seed=recipe.seed), names,
                       outputs=recipe.data.task == "regression" or (
                           names is None and is_text_folder(recipe.model.source)))
    elif recipe.data.label_space == "model":  # labels index the model's own outputs
        data = in_model_space(data, *own_outputs(recipe.model, data.input_shape,
                                                 pretrained=False))
    n_out = data.n_outputs
    if recipe.model.source.lower().endswith(".onnx"):
        return _run_onnx(recipe, data, device, n_out, out_dir, emit)
    tensors = to_tensors(data, device)
    emit({"event": "stage", "stage": "train", "message": f"training on {device.type}",
          "epochs": recipe.train.epochs})
    model, fit = fit_fresh(recipe, data, device=device, tensors=tensors,
                           on_progress=lambda event: emit({**event, "variant": "baseline"}))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ctx = CompressContext.of_run(recipe, data, tensors, device, emit)
        ctx.baseline_model = model
        ctx.export_onnx = recipe.export.onnx
        measured = [measure("baseline", StepResult(model, history=fit.history), ctx, folder,
                            chain=[], reference=None, huffman=False)]
        baseline = measured[0].variant
        # what loading the model had to say (a classifier head replaced, random weights)
        baseline["metrics"]["notes"][:0] = [*getattr(model, "workbench_notes", []), *(
            [data.text["note"]] if data.text and data.text.get("note") else [])]
        baseline["metrics"].update(epochs_run=len(fit.history["epoch"]),
                                   best_epoch=fit.best_epoch, train_time_s=fit.seconds)
        baseline["stopped"] = fit.stopped
        result = {
            "recipe": asked.to_dict(),
            "device": str(device),
            "machine": machine(),
            "data": data.summary(),
            "train": {"path": fit.path},  # device, precision, compiled: how it trained
            "variants": [baseline],
            "tuning": tuning,
            "diagnostics": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if fit.stopped == "diverged":
            baseline["error"] = fit.message
            if out_dir is not None:
                write_result(result, out_dir)
            raise TrainingDivergedError(fit.message, result)
        keep = out_dir is not None
        _announce(baseline, emit, keep_file=keep)
        measured += _compress_chain(recipe, model, ctx, folder, result, emit, keep=keep)
        found = None
        if recipe.autocompress is not None:
            found = _autocompress(recipe, data, model, ctx, folder, result, emit,
                                  storage=storage or store_url(), executor=executor,
                                  keep=keep)
            measured += found[0]
        emit({"event": "stage", "stage": "latency", "message": f"timing {len(measured)} "
              f"variant(s) in the same rounds"})
        time_variants(measured)  # one latency per variant, every ratio from those figures
        if found and found[0]:  # the recommendation's words, from its measured figures
            finish(result["autocompress"], found[1], found[0][0].variant, baseline,
                   found[2], model)
        for m in measured:  # the variants again, now with their latency
            _announce(m.variant, emit, keep_file=keep)
        if tuning is not None:
            result["trained_recipe"] = recipe.to_dict()
        if recipe.diagnose is not None:
            emit({"event": "stage", "stage": "diagnose", "message": "diagnosing the model"})
            result["diagnostics"] = run_diagnostics(recipe, data, model, device=device,
                                                    emit=emit)
        if recipe.sensitivity is not None:
            emit({"event": "stage", "stage": "sensitivity",
                  "message": "measuring each layer's sensitivity"})
            result["sensitivity"] = sensitivity(model, ctx, recipe.sensitivity)
        if out_dir is not None:
            write_result(result, out_dir)
    emit({"event": "done"})
    return result


def _compress_chain(recipe: Recipe, model: torch.nn.Module, ctx: Any, folder: Path,
                    result: dict[str, Any], emit: ProgressFn, *, keep: bool
                    ) -> list[Measured]:
    """Each step starts from the previous step's model and yields one measured variant."""
    steps = recipe.compress
    baseline = result["variants"][0]
    chain: list[str] = []
    huffman, used = False, set()
    names = [step_name(step, used) for step in steps]

    def announce(i: int) -> None:
        emit({"event": "stage", "stage": "compress", "message": f"step {i + 1} of "
              f"{len(steps)}: {names[i]}", "step": i + 1, "steps": len(steps)})

    if steps:
        announce(0)
    measured = []
    for i, step, outcome in run_chain(model, steps, ctx):
        huffman = huffman or outcome.huffman
        chain.append(describe_step(step))
        measured.append(measure(names[i], outcome, ctx, folder, chain=list(chain),
                                reference=baseline, huffman=huffman,
                                technique=step["technique"]))
        result["variants"].append(measured[-1].variant)
        _announce(measured[-1].variant, emit, keep_file=keep)
        if i + 1 < len(steps):
            announce(i + 1)
    return measured


def _autocompress(recipe: Recipe, data: Any, model: torch.nn.Module, ctx: CompressContext,
                  folder: Path, result: dict[str, Any], emit: ProgressFn, *, storage: str,
                  executor: Executor | None, keep: bool
                  ) -> tuple[list[Measured], list[dict[str, Any]], torch.nn.Module | None]:
    """The recipe's search: its section in the result, and the recommended candidate
    measured as the variant `autocompress` (timed later with the others)."""
    section, outcome, chain = autocompress(
        model, ctx, recipe.autocompress, recipe_dict=recipe.to_dict(), storage=storage,
        executor=executor, emit=emit,
        worker_payload=lambda: {"recipe": recipe, "data": data,
                                "bundle": str(folder / "baseline")})
    result["autocompress"] = section
    if outcome is None:
        return [], [], None
    section["recipe"] = {**recipe.to_dict(), "compress": chain, "autocompress": None}
    measured = measure(VARIANT, outcome, ctx, folder, chain=[describe_step(s) for s in
                                                            resolve_chain(chain)],
                       reference=result["variants"][0],
                       huffman=outcome.huffman,
                       technique="autocompress")
    measured.variant["metrics"]["notes"][:0] = [
        f"Found by auto-compress: trial {section['chosen_trial']} of "
        f"{len(section['trials'])}, the least {section['objective']} within the budget "
        f"({budget_text(section['budget'], section['confidence'])}) on the validation "
        f"rows."]
    result["variants"].append(measured.variant)
    _announce(measured.variant, emit, keep_file=keep)
    return [measured], chain, outcome.model


def _run_onnx(recipe: Recipe, data: Any, device: torch.device, n_out: int,
              out_dir: str | Path | None, emit: ProgressFn) -> dict[str, Any]:
    """An uploaded .onnx model, which has no PyTorch module: ONNX Runtime evaluates and
    times it as it is, and a dynamic int8 copy is made; no training, no other steps."""
    if recipe.compress or recipe.train.freeze or recipe.autocompress:
        raise UserError("an ONNX model can only be evaluated and int8-quantized here; "
                        "remove the compress steps, autocompress and train.freeze, or "
                        "upload a .pt2.")
    source = Path(recipe.model.source)
    file = read_onnx(source)  # checked: external data only from its own folder
    session = ort_session(file, threads=1)
    fits = _onnx_input_fits(session, data)
    width = onnx_output_width(source)
    if width is not None and width != n_out:  # an encoder, or another label set
        raise UserError(f"{source.name} gives {width} outputs per sample but this data needs "
                        f"{n_out} (one per class, or one for regression); upload the model "
                        f"with its classification head, or set data.label_space \"model\" "
                        f"if the labels are its output indices.")
    tensors = to_tensors(data, device)
    ctx = CompressContext.of_run(recipe, data, tensors, device, emit)
    pad_id = (data.text or {}).get("pad_id")  # a transformer: ids and mask from the tokenizer
    candidates = [("baseline", file, ["the uploaded ONNX model, as it is"])]
    try:
        candidates.append(("quantize-dynamic_int8",
                           *quantize_onnx(file, method="dynamic_int8", per_channel=True)))
    except Exception as exc:  # an exotic graph: the model as uploaded is still measured
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        candidates[0][2].append(f"ONNX Runtime could not quantize this graph to int8 "
                                f"({type(exc).__name__}: {reason}), so only the model as "
                                f"uploaded is measured.")
    variants = []
    for name, blob, notes in candidates:
        metrics: dict[str, Any] = {**onnx_complexity(source), "size_bytes": len(blob),
                                   "runtime": "onnxruntime", "chain": name, "notes": notes}
        if fits:
            module = SessionModule(ort_session(blob), pad_id=pad_id)
            for part in ("train", "val"):
                metrics.update({f"{part}_{k}": v for k, v in ctx.evaluate(module, part).items()})
            if len(tensors["X_test"]):  # one pass over the test rows: scores and fidelity
                test_out = outputs(module, tensors["X_test"])
                metrics.update({f"test_{k}": v for k, v in
                                scores_of(test_out, tensors["y_test"], data.task).items()})
                metrics.update(fidelity(test_out, ctx, baseline=name == "baseline"))
        else:
            metrics["notes"] = [*notes, f"its input {_onnx_input_shape(session)} does not fit "
                                f"this dataset's samples {list(data.input_shape)}, so its "
                                f"size is measured but it is neither scored nor timed."]
        metrics["size_bytes"] = len(blob)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / f"{name}.onnx").write_bytes(blob)
        variant = {"name": name, "technique": None if name == "baseline" else "quantize",
                   "metrics": metrics, "history": {},
                   "model_file": f"{name}.onnx" if out_dir is not None else None}
        variants.append(variant)
    base = variants[0]["metrics"]
    figures = round_robin({name: ort_call(blob, data.input_shape)
                           for name, blob, _ in candidates}) if fits else {}
    for v in variants:  # one latency each, all from the same rounds
        q = v["metrics"]
        if fits:
            figure = figures[v["name"]]
            q.update(latency_ms=figure["median_ms"], latency_p95_ms=figure["p95_ms"],
                     latency_threads=figure["threads"], latency_calls=figure["calls"])
        if v is not variants[0]:
            q["size_ratio"] = base["size_bytes"] / q["size_bytes"]
            q["size_reference"] = "the uploaded .onnx file"
            if fits:
                q["speedup"] = base["latency_ms"] / q["latency_ms"]
                q["speedup_reference"] = f"the uploaded model, ONNX Runtime, {THREADS} thread"
        _announce(v, emit, keep_file=out_dir is not None)
    result = {"recipe": recipe.to_dict(), "device": "onnxruntime-cpu", "machine": machine(),
              "data": data.summary(), "variants": variants, "tuning": None,
              "diagnostics": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if out_dir is not None:
        write_result(result, out_dir)
    emit({"event": "done"})
    return result


def _onnx_input_shape(session: Any) -> list[Any]:
    return list(session.get_inputs()[0].shape[1:])


def _onnx_input_fits(session: Any, data: Any) -> bool:
    """Whether the model's declared input takes this dataset's preprocessed samples."""
    declared = _onnx_input_shape(session)
    return len(declared) == len(data.input_shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(declared, data.input_shape,
                                                         strict=True))


def _announce(variant: dict[str, Any], emit: ProgressFn, *, keep_file: bool) -> None:
    if not keep_file:
        variant.pop("model_file", None)
    emit({"event": "variant", "name": variant["name"], "technique": variant["technique"],
          "metrics": variant["metrics"], "model_file": variant.get("model_file")})


def write_result(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `result.json` (NaN, which JSON lacks, is written as null)."""
    path = Path(out_dir) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2), encoding="utf-8")
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
