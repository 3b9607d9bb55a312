"""The search: one Optuna study over compression chains, every candidate measured honestly.

Each trial samples a chain (`space.sample_chain`), runs it from the same trained baseline
(`engine.compress.run_chain`, the loop every chain goes through) and measures what it
would ship: the score on the validation part (held out: fine-tuning never sees it), the
size of the file it ships in (the `.wbz` encoding of a PyTorch model, the `.onnx` of an
ONNX Runtime one) and, when latency matters, its batch-1 latency at one thread in that
runtime, timed in the same rounds as the baseline: its `latency_ms` is the baseline's
(timed once, at the start) divided by that speedup, as the machine's speed drifts between
trials and the ratio holds (`latency_in_rounds_ms` is the raw figure). Two objectives,
both minimized: the score's drop and the cost (bytes or milliseconds); the budget is the
sampler's constraint, so the search leans toward chains that meet it. The study lives in
the run store's database (an Optuna RDB storage): a study of the same name resumes, and
workers on an executor share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine.autocompress.space import BIT_CHOICES, bit_drops, sample_chain
from engine.bundle import load_bundle
from engine.compress import CompressContext, StepResult, clone, resolve_chain, run_chain
from engine.compress.encode import encode
from engine.compress.onnx_int8 import onnx_metrics
from engine.compress.sensitivity import sensitivity
from engine.errors import UserError
from engine.executor import Executor, ProcessPool
from engine.export import SessionModule, compact, onnx_bytes, ort_call, ort_session
from engine.latency import THREADS, round_robin, torch_call
from engine.metrics import metric_name, predict
from engine.recipe import SensitivityConfig
from engine.train import to_tensors
from engine.tune import optuna_storage

if TYPE_CHECKING:
    import optuna

POLL_S = 0.5
TRIAL_ROUNDS = 3  # a trial's latency: 3 rounds against the baseline, about 0.5 s each
TRIAL_BUDGET_S = 0.5
BUSY_S = 5.0
ATTRS = ("chain", "metrics")  # what each trial keeps in the study (user attributes)


@dataclass
class Baseline:
    """The trained model every candidate starts from, and its figures."""

    model: nn.Module
    score: float  # on the validation part
    size_bytes: int  # its .wbz file
    timer: Callable[[], Any]
    correct: np.ndarray | None = None  # which validation rows it gets right (classifiers)
    latency_ms: float | None = None  # timed once, at the search's start (full rounds)
    onnx: bytes | None = None  # as a float32 .onnx (searches that ship in ONNX Runtime)


@dataclass
class Search:
    """What one search needs besides the study: the context, the section, the widths."""

    ctx: CompressContext
    cfg: dict[str, Any]
    drops: dict[str, dict[int, float]]
    base: Baseline
    kept: dict[int, StepResult] = field(default_factory=dict)  # the best feasible model,
    best_cost: float = math.inf  # by trial number, and its cost
    emit: Callable[[dict[str, Any]], None] = lambda event: None  # the run's progress
    _said: float = 0.0  # when a trial last said it was still fine-tuning

    @property
    def timed(self) -> bool:
        return self.cfg["objective"] == "latency" or "max_latency_ms" in self.cfg["budget"]


def baseline_of(model: nn.Module, ctx: CompressContext, runtime: str = "torch"
                ) -> Baseline:
    """The baseline's figures, in the runtime the candidates are measured in."""
    score = ctx.evaluate(model, "val")[metric_name(ctx.task)]
    if runtime == "onnxruntime":
        file = float_onnx(model, ctx)
        return Baseline(model, score, len(file), ort_call(file, ctx.input_shape),
                        _correct(model, ctx), onnx=file)
    return Baseline(model, score, len(encode(model)), torch_call(model, ctx.input_shape),
                    _correct(model, ctx))


def float_onnx(model: nn.Module, ctx: CompressContext) -> bytes:
    return compact(onnx_bytes(clone(model).cpu(), ctx.input_shape))


def shipped_in_onnx(outcome: StepResult, ctx: CompressContext) -> StepResult:
    """A PyTorch candidate as the float32 .onnx file it ships in when the search's runtime
    is ONNX Runtime (dense: its zeros cost their bytes there)."""
    file = float_onnx(outcome.model, ctx)
    return StepResult(model=None, runtime="onnxruntime", onnx_bytes=file,
                      metrics=onnx_metrics(file, ctx), history=outcome.history,
                      notes=[*outcome.notes, "Shipped as a float32 .onnx file for ONNX Runtime "
                             "(autocompress.runtime onnxruntime)."])


def _correct(model: nn.Module, ctx: CompressContext) -> np.ndarray | None:
    if ctx.task != "classification":
        return None
    found = predict(model, ctx.tensors["X_val"].cpu().numpy())
    return found.argmax(1) == ctx.tensors["y_val"].cpu().numpy()


def drop_error(base: np.ndarray | None, now: np.ndarray | None) -> float | None:
    """The standard error of a paired difference in accuracy on the same rows: how far
    the validation rows alone can be trusted (on 360 rows, about one point for a model
    that disagrees with the baseline on a dozen)."""
    if base is None or now is None:
        return None
    n = len(base)
    lost, gained = int((base & ~now).sum()), int((~base & now).sum())
    return math.sqrt(max(0.0, lost + gained - (lost - gained) ** 2 / n)) / n


def layer_drops(model: nn.Module, ctx: CompressContext) -> dict[str, dict[int, float]]:
    """Each layer's validation loss increase when it alone is quantized at each offered
    width: measured
    once per search (no fine-tuning), then every trial's mixed precision reads it."""
    found = sensitivity(model, ctx, SensitivityConfig(amounts=(), bits=BIT_CHOICES,
                                                      ranks=()))
    return bit_drops(found["records"], found["baseline_loss"])


def candidate(chain: list[dict[str, Any]], search: Search
              ) -> tuple[dict[str, Any], StepResult]:
    """Run `chain` from the baseline and measure it: (metrics, the last step's result)."""
    ctx, base = search.ctx, search.base
    steps = resolve_chain(chain)
    outcome, huffman = StepResult(model=clone(base.model)), False
    quiet = dataclasses.replace(ctx, on_progress=lambda event: _still_busy(search, event))
    for _, _, outcome in run_chain(base.model, steps, quiet):
        huffman = huffman or outcome.huffman
    if search.cfg["runtime"] == "onnxruntime" and outcome.runtime == "torch":
        outcome = shipped_in_onnx(outcome, ctx)
    metric = metric_name(ctx.task)
    if outcome.runtime == "torch":
        score = ctx.evaluate(outcome.model, "val")[metric]
        correct = _correct(outcome.model, ctx)
        size = len(encode(outcome.model, huffman=huffman))
        timer = torch_call(outcome.model, ctx.input_shape) if search.timed else None
    else:
        session = SessionModule(ort_session(outcome.onnx_bytes))
        score, correct = ctx.evaluate(session, "val")[metric], _correct(session, ctx)
        size = len(outcome.onnx_bytes)
        timer = ort_call(outcome.onnx_bytes, ctx.input_shape) if search.timed else None
    metrics: dict[str, Any] = {
        "val_score": score, "drop": base.score - score,
        "drop_se": drop_error(base.correct, correct), "size_bytes": size,
        "size_ratio": base.size_bytes / size, "runtime": outcome.runtime,
        "huffman": huffman}
    if timer is not None:  # against the baseline in the same rounds: the ratio is what
        #                    holds while the machine's speed drifts from trial to trial
        if base.latency_ms is None:
            base.latency_ms = round_robin({"baseline": base.timer})["baseline"]["median_ms"]
        figures = round_robin({"baseline": base.timer, "candidate": timer},
                              rounds=TRIAL_ROUNDS, budget_s=TRIAL_BUDGET_S)
        speedup = figures["baseline"]["median_ms"] / figures["candidate"]["median_ms"]
        metrics.update(latency_ms=base.latency_ms / speedup, speedup=speedup,
                       latency_in_rounds_ms=figures["candidate"]["median_ms"],
                       speedup_reference=f"the baseline, "
                       f"{'ONNX Runtime float32' if base.onnx else 'PyTorch eager'}, "
                       f"{THREADS} thread, in the same rounds")
    return metrics, outcome


def _still_busy(search: Search, event: dict[str, Any]) -> None:
    """A trial's fine-tuning epochs, not stored one by one (40 trials' curves would bury the
    run's own): at most one stage event every BUSY_S, so the run shows it is alive and a
    cancel request is seen."""
    now = time.monotonic()
    if event.get("event") == "epoch" and now - search._said >= BUSY_S:
        search._said = now
        search.emit({"event": "stage", "stage": "autocompress",
                     "message": f"a trial is fine-tuning ({event.get('variant')}, epoch "
                                f"{event.get('epoch')})"})


def cost(metrics: dict[str, Any], objective: str) -> float:
    return metrics["size_bytes"] if objective == "size" else metrics["latency_ms"]


def violations(metrics: dict[str, Any], budget: dict[str, float], confidence: float = 0.0
               ) -> dict[str, float]:
    """Per budget key, how far past it (<= 0: met), as Optuna's constraints want them:
    the drop as a fraction (plus `confidence` standard errors), sizes and latencies as
    fractions of their limit."""
    out = {}
    if "max_drop" in budget:
        margin = confidence * (metrics.get("drop_se") or 0.0)
        out["max_drop"] = metrics["drop"] + margin - budget["max_drop"]
    if "max_size_bytes" in budget:
        out["max_size_bytes"] = metrics["size_bytes"] / budget["max_size_bytes"] - 1
    if "max_latency_ms" in budget:
        out["max_latency_ms"] = metrics["latency_ms"] / budget["max_latency_ms"] - 1
    return out


def objective(trial: optuna.Trial, search: Search) -> tuple[float, float]:
    chain = sample_chain(trial, search.cfg, search.drops)
    trial.set_user_attr("chain", chain)
    try:
        metrics, outcome = candidate(chain, search)
    except UserError as exc:  # a technique that cannot apply to this model: said, skipped
        trial.set_user_attr("error", str(exc))
        raise
    over = violations(metrics, search.cfg["budget"], search.cfg["confidence"])
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("violations", over)
    for key, value in over.items():
        trial.set_constraint(key, value)  # the sampler leans toward chains that meet it
    spent = cost(metrics, search.cfg["objective"])
    if all(v <= 0 for v in over.values()) and spent < search.best_cost:  # kept, not rebuilt later
        search.kept, search.best_cost = {trial.number: outcome}, spent
    return metrics["drop"], spent


def fingerprint(recipe_dict: dict[str, Any]) -> str:
    """What makes two baselines the same: data, model, training and seed."""
    keys = ("seed", "data", "model", "train")
    text = json.dumps({k: recipe_dict.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_study(url: str, name: str, cfg: dict[str, Any], seed: int, *, create: bool,
               baseline_key: str | None = None) -> optuna.Study:
    import optuna

    if cfg["sampler"] == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(20, cfg["trials"] // 4)))
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)
    kwargs = {"storage": optuna_storage(url), "sampler": sampler, "study_name": name}
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(**kwargs, directions=["minimize", "minimize"],
                                load_if_exists=True)
    known = study.user_attrs.get("baseline")
    if known is None:
        study.set_user_attr("baseline", baseline_key)
        study.set_user_attr("objective", cfg["objective"])
    elif known != baseline_key or study.user_attrs.get("objective") != cfg["objective"]:
        raise UserError(f"autocompress.study {name!r} searched another baseline or "
                        f"objective; give a new study name, or the same recipe to resume it.")
    return study


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))


def trial_record(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial as the result and the live page show it."""
    record = {"number": t.number, "state": t.state.name, "chain": t.user_attrs.get("chain"),
              "duration_s": t.duration.total_seconds() if t.duration else None}
    if t.state.name == "COMPLETE":
        record["metrics"] = t.user_attrs.get("metrics")
        record["meets_budget"] = all(v <= 0 for v in t.user_attrs.get("violations",
                                                                       {}).values())
    else:
        record["error"] = t.user_attrs.get("error") or "the trial failed"
    return record


def run_search(search: Search, *, storage: str, name: str | None, seed: int,
               baseline_key: str, executor: Executor | None,
               worker_args: Callable[[str, int, int, int], tuple[Any, ...]] | None = None,
               on_trial: Callable[[dict[str, Any]], None] = lambda record: None
               ) -> tuple[str, list[dict[str, Any]]]:
    """Run the study to `trials` finished trials (or `timeout_s`); (its name, its trials)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg = search.cfg
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = name or f"autocompress-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    study = open_study(storage, name, cfg, seed, create=True, baseline_key=baseline_key)
    seen = {t.number for t in finished(study)}
    remaining = cfg["trials"] - len(seen)

    def report_new() -> None:
        for t in sorted(finished(study), key=lambda t: t.number):
            if t.number not in seen:
                seen.add(t.number)
                on_trial(trial_record(t))

    if remaining > 0:
        workers = min(cfg["workers"], remaining)
        executor = executor or ProcessPool()
        if workers == 1 and not executor.always_fan_out:
            study.optimize(lambda trial: objective(trial, search), n_trials=remaining,
                           timeout=cfg["timeout_s"], catch=(UserError,),
                           callbacks=[MaxTrialsCallback(cfg["trials"], states=(
                               TrialState.COMPLETE, TrialState.FAIL)),
                               lambda s, t: report_new()])
        elif worker_args is not None:
            quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
            threads = executor.threads_per_task(workers)
            executor.run_all([(run_worker, worker_args(name, seed + 1 + i, quota, threads))
                              for i, quota in enumerate(quotas)],
                             poll=report_new, poll_s=POLL_S)
    report_new()
    return name, [trial_record(t) for t in finished(study)]


def run_worker(search_args: dict[str, Any], storage: str, name: str, seed: int, quota: int,
               threads: int) -> None:
    """A worker's share of the trials (a spawned process, a Ray task): the baseline
    rebuilt from its bundle, the study loaded from the storage."""
    import optuna

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe, data = search_args["recipe"], search_args["data"]
    device = torch.device("cpu")
    ctx = CompressContext.of_run(recipe, data, to_tensors(data, device), device,
                                 lambda event: None)
    model = load_bundle(search_args["bundle"])
    ctx.baseline_model = model
    search = Search(ctx, search_args["cfg"], search_args["drops"],
                    baseline_of(model, ctx, search_args["cfg"]["runtime"]))
    study = open_study(storage, name, search.cfg, seed, create=False)
    study.optimize(lambda trial: objective(trial, search), n_trials=quota,
                   timeout=search.cfg["timeout_s"], catch=(UserError,))
