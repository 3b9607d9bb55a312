"""The `autocompress` section and the chains a search may try.

A section reads `{"budget": {"max_drop": 0.01}, "objective": "size", "trials": 40,
"timeout_s": 600, "techniques": [...]}`; `validate_autocompress` fills the rest (DEFAULTS)
and refuses a wrong key in one sentence. `sample_chain` turns one Optuna trial into a
compression chain in a fixed order (distill -> structured pruning -> magnitude pruning ->
low rank -> sharing or quantization), each stage present only when its technique is
allowed and the trial switches it on. Mixed precision comes from the baseline's measured
sensitivity (`allocate_bits`): a trial picks a floor and a tolerance, and each layer gets
the fewest bits at which quantizing it alone costs at most that tolerance.
"""

from __future__ import annotations

import itertools
from typing import Any

from engine.errors import UserError

OBJECTIVES = ("size", "latency")
#: what each stage may be; "prune" is magnitude pruning, "structured" removes whole neurons
#: and filters, "quantize" is k-bit (mixed precision), fp16 or ONNX Runtime int8
TECHNIQUES = ("distill", "structured", "prune", "lowrank", "share", "quantize")
DEFAULT_TECHNIQUES = {"size": ("structured", "prune", "share"),
                      "latency": ("structured", "lowrank", "quantize")}
OBJECTIVE_LABELS = {"size": "Smallest file", "latency": "Fastest at batch 1"}
TECHNIQUE_LABELS = {"distill": "distillation (a narrower student)",
                    "structured": "structured pruning (whole neurons, filters)",
                    "prune": "magnitude pruning", "lowrank": "low-rank SVD",
                    "share": "weight sharing, mixed precision",
                    "quantize": "quantization (k-bit mixed, fp16, int8)"}
SAMPLERS = ("tpe", "nsga2")
BIT_CHOICES = (2, 3, 4, 5, 6, 8)  # widths the sensitivity is measured at, and offered
DEFAULTS: dict[str, Any] = {
    "budget": {"max_drop": 0.01},  # absolute points of the score as a fraction (0.01 = 1)
    "objective": "size",
    "trials": 40,
    "timeout_s": 600,
    "techniques": None,  # None: DEFAULT_TECHNIQUES[objective]
    "sampler": "tpe",
    "max_epochs": 20,  # most fine-tuning epochs a stage may take
    "study": None,  # an Optuna study name: the same name resumes that search
    "workers": 1,  # processes (or Ray tasks) sharing the study
    "seed": None,  # the sampler's seed; None: the recipe's
    "confidence": 1.0,  # standard errors of the validation drop added before it is compared
    #                     with max_drop: 1 asks for a margin of one standard error (on the
    #                     bench's digits MLP, 0 let every seed's winner exceed the budget on
    #                     the test rows); 0 trusts the validation rows as they are
    "runtime": None,  # where candidates are timed and the winner ships: torch, or
    #                   onnxruntime (PyTorch candidates exported as float32 .onnx);
    #                   None: onnxruntime for the latency objective, torch for size
}
RUNTIMES = ("torch", "onnxruntime")
BUDGET_KEYS = ("max_drop", "max_size_bytes", "max_latency_ms")


def validate_autocompress(raw: dict[str, Any]) -> dict[str, Any]:
    """The section with every default filled in; idempotent."""
    if not isinstance(raw, dict):
        raise UserError(f'autocompress must be an object such as {{"budget": {{"max_drop": '
                        f'0.01}}, "objective": "size"}}, got {raw!r}.')
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise UserError(f"autocompress has no key {unknown[0]!r}; its keys are "
                        f"{', '.join(DEFAULTS)}.")
    cfg = {**DEFAULTS, **raw}
    budget = cfg["budget"]
    if not isinstance(budget, dict) or not budget or set(budget) - set(BUDGET_KEYS):
        raise UserError(f"autocompress.budget must give one or more of "
                        f"{', '.join(BUDGET_KEYS)}, such as {{\"max_drop\": 0.01}}.")
    for key, value in budget.items():
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
                or (key != "max_drop" and value == 0)):
            raise UserError(f"autocompress.budget.{key} must be a positive number, got "
                            f"{value!r}.")
    if budget.get("max_drop", 0) >= 1:
        raise UserError(f"autocompress.budget.max_drop is a fraction (0.01 is one point), "
                        f"got {budget['max_drop']}.")
    if cfg["objective"] not in OBJECTIVES:
        raise UserError(f"autocompress.objective must be size or latency, got "
                        f"{cfg['objective']!r}.")
    runtime = cfg["runtime"] or ("onnxruntime" if cfg["objective"] == "latency" else "torch")
    if runtime not in RUNTIMES:
        raise UserError(f"autocompress.runtime must be torch or onnxruntime, got "
                        f"{runtime!r}.")
    cfg["runtime"] = runtime
    if (not isinstance(cfg["confidence"], (int, float)) or isinstance(cfg["confidence"], bool)
            or not 0 <= cfg["confidence"] <= 5):
        raise UserError(f"autocompress.confidence is a number of standard errors from 0 to "
                        f"5, got {cfg['confidence']!r}.")
    if cfg["sampler"] not in SAMPLERS:
        raise UserError(f"autocompress.sampler must be tpe or nsga2, got {cfg['sampler']!r}.")
    techniques = cfg["techniques"] or DEFAULT_TECHNIQUES[cfg["objective"]]
    if isinstance(techniques, str) or not set(techniques) <= set(TECHNIQUES):
        raise UserError(f"autocompress.techniques must be a list drawn from "
                        f"{', '.join(TECHNIQUES)}, got {techniques!r}.")
    for key, low in (("trials", 1), ("timeout_s", 1), ("max_epochs", 0), ("workers", 1)):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < low:
            raise UserError(f"autocompress.{key} must be a whole number of at least {low}, "
                            f"got {cfg[key]!r}.")
    return {**cfg, "budget": dict(budget), "techniques": list(techniques)}


def allocate_bits(sensitivity: dict[str, dict[int, float]], *, floor: int,
                  tolerance: float) -> dict[str, int]:
    """Each layer's width: the fewest bits (at least `floor`) at which quantizing that layer
    alone raised the validation loss by at most `tolerance`; the most offered where none
    did."""
    chosen = {}
    for layer, drops in sensitivity.items():
        fits = [b for b in BIT_CHOICES if b >= floor and drops.get(b, 1.0) <= tolerance]
        chosen[layer] = min(fits) if fits else max(BIT_CHOICES)
    return chosen


def bit_drops(records: list[dict[str, Any]], baseline_loss: float
              ) -> dict[str, dict[int, float]]:
    """{layer: {bits: validation loss increase}} from `engine.compress.sensitivity`'s
    quantize records: the loss, not the score, which on a few hundred rows moves in steps
    of whole rows and ties most layers; made monotone, as one noisy measurement at a
    width must not make fewer bits look safer than more."""
    drops: dict[str, dict[int, float]] = {}
    for r in records:
        if r["technique"] == "quantize":
            bits = int(r["setting"].removesuffix("-bit"))
            drops.setdefault(r["layer"], {})[bits] = max(0.0, r["loss"] - baseline_loss)
    for rises in drops.values():  # fewer bits never count as less harmful than more
        for wider, narrower in itertools.pairwise(sorted(rises, reverse=True)):
            rises[narrower] = max(rises[narrower], rises[wider])
    return drops


def sample_chain(trial: Any, cfg: dict[str, Any],
                 drops: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """One trial's chain, as recipe steps; empty stages are left out."""
    allowed, most = set(cfg["techniques"]), cfg["max_epochs"]
    chain: list[dict[str, Any]] = []

    def epochs(name: str, high: int = most) -> int:
        return trial.suggest_int(name, 0, max(0, high))

    if "distill" in allowed and trial.suggest_categorical("distill", [False, True]):
        chain.append({"technique": "distill",
                      "width_multiplier": round(trial.suggest_float("distill_width", 0.1,
                                                                    0.9), 3),
                      "epochs": trial.suggest_int("distill_epochs", 5, max(5, 2 * most))})
    if "structured" in allowed:
        amount = trial.suggest_float("structured_amount", 0.0, 0.9)
        if amount >= 0.05:
            chain.append({"technique": "prune", "method": "structured",
                          "amount": round(amount, 3),
                          "finetune_epochs": epochs("structured_epochs")})
    if "prune" in allowed:
        amount = trial.suggest_float("prune_amount", 0.0, 0.98)
        if amount >= 0.05:
            chain.append({"technique": "prune", "method": "magnitude",
                          "amount": round(amount, 3),
                          "scope": trial.suggest_categorical("prune_scope",
                                                             ["lamp", "layer", "global"]),
                          "finetune_epochs": epochs("prune_epochs")})
    if "lowrank" in allowed and trial.suggest_categorical("lowrank", [False, True]):
        chain.append({"technique": "lowrank", "method": "svd",
                      "energy": round(trial.suggest_float("lowrank_energy", 0.5, 0.999), 4),
                      "finetune_epochs": epochs("lowrank_epochs")})
    last = [t for t in ("share", "quantize") if t in allowed]
    if allowed - {"share", "quantize"}:  # (the same choices in every trial of a study)
        last = ["none", *last]  # no last stage, when an earlier one may do the work
    kind = trial.suggest_categorical("last", last) if last else "none"
    if kind == "share" or (kind == "quantize" and "quantize" in allowed):
        method = "share" if kind == "share" else trial.suggest_categorical(
            "quantize_method", ["static_int8", "dynamic_int8", "uniform", "fp16"])
        if method in ("share", "uniform"):
            floor = trial.suggest_int("bits_floor", 2, 8)
            tolerance = trial.suggest_float("bits_tolerance", 1e-4, 1.0, log=True)
            widths = allocate_bits(drops, floor=floor, tolerance=tolerance)
            base = max(set(widths.values()), key=list(widths.values()).count)
            step = {"technique": kind, "bits": base,
                    "layer_bits": {k: v for k, v in widths.items() if v != base},
                    "finetune_epochs": epochs("bits_epochs", max(1, most // 2))}
            if method == "uniform":
                step["method"] = "uniform"
            chain.append(step)
        else:
            chain.append({"technique": "quantize", "method": method})
    return chain


def explain(chain: list[dict[str, Any]]) -> list[str]:
    """What the chain did, one plain sentence per stage."""
    lines = []
    for step in chain:
        t, method = step["technique"], step.get("method")
        epochs = step.get("finetune_epochs", 0)
        tuned = f", then {epochs} epoch{'s' * (epochs != 1)} of fine-tuning" if epochs else ""
        if t == "distill":
            lines.append(f"Distilled into a student at {step['width_multiplier']:.0%} of "
                         f"the width, trained {step['epochs']} epochs.")
        elif t == "prune" and method == "structured":
            lines.append(f"Removed {step['amount']:.0%} of the hidden neurons and filters"
                         f"{tuned}.")
        elif t == "prune":
            lines.append(f"Pruned {step['amount']:.0%} of the weights by magnitude "
                         f"({step['scope']} scope){tuned}.")
        elif t == "lowrank":
            lines.append(f"Factorized each layer by SVD, keeping {step['energy']:.1%} of its "
                         f"energy{tuned}.")
        elif t in ("share", "quantize") and "bits" in step:
            widths = {**step.get("layer_bits", {})}
            others = f"; the other layers {step['bits']} bits" if widths else ""
            each = ", ".join(f"{k}: {v} bits" for k, v in widths.items())
            how = "shared weights (k-means)" if t == "share" else "uniform k-bit weights"
            lines.append(f"{how.capitalize()} at {step['bits']} bits per weight"
                         + (f", mixed precision by sensitivity ({each}{others})" if widths
                            else "") + f"{tuned}.")
        else:
            lines.append(f"Quantized with {method} "
                         f"({'ONNX Runtime' if method.endswith('int8') else 'PyTorch'}).")
    return lines or ["Left as it is: no compression met the search's settings better."]
