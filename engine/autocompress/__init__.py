"""Auto-compress: the smallest or fastest model within an accuracy budget.

A recipe's `autocompress` section (`space.DEFAULTS` lists its keys) makes the run search,
from its one trained baseline, over chains of the registered techniques and their
settings (`space.sample_chain`), on Optuna with the budget as a constraint
(`search.run_search`). The result's `autocompress` holds every finished trial, the Pareto
`front` (score drop against bytes or milliseconds), and the `recommended` variant's name:
the candidate that meets the budget at the least cost, which the runner measures and
times like any other variant (`result["variants"]`), so every figure of it shown anywhere
is the harness's. `explain` says in words and as data what it did to which layer. When no
candidate meets the budget, `message` says how close the best came.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from engine.autocompress.search import (
    Search,
    baseline_of,
    candidate,
    fingerprint,
    layer_drops,
    run_search,
)
from engine.autocompress.space import (
    DEFAULT_TECHNIQUES,
    DEFAULTS,
    OBJECTIVE_LABELS,
    OBJECTIVES,
    TECHNIQUE_LABELS,
    TECHNIQUES,
    allocate_bits,
    explain,
    validate_autocompress,
)
from engine.compress import CompressContext, StepResult, prunable
from engine.errors import UserError
from engine.executor import Executor
from engine.measure import BASELINE_REFERENCE
from engine.metrics import score_key

__all__ = ["DEFAULTS", "DEFAULT_TECHNIQUES", "OBJECTIVES", "OBJECTIVE_LABELS", "TECHNIQUES",
           "TECHNIQUE_LABELS", "VARIANT",
           "allocate_bits",
           "autocompress", "budget_text", "finish", "pareto_front", "validate_autocompress"]

VARIANT = "autocompress"  # the recommended candidate's name in result["variants"]


def pareto_front(records: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """The completed trials no other trial beats on both the drop and the cost, by cost."""
    done = [r for r in records if r["state"] == "COMPLETE" and r.get("metrics")]

    def key(r: dict[str, Any]) -> tuple[float, float]:
        m = r["metrics"]
        return m["drop"], m["size_bytes"] if objective == "size" else m["latency_ms"]

    front = [r for r in done if not any(
        key(o)[0] <= key(r)[0] and key(o)[1] <= key(r)[1] and key(o) != key(r) for o in done)]
    return sorted(front, key=lambda r: key(r)[1])


def budget_text(budget: dict[str, float], confidence: float = 0.0) -> str:
    """`at most 1 point lost, at most 5,000 bytes`."""
    parts = []
    if "max_drop" in budget:
        points = budget["max_drop"] * 100
        margin = (f" with a margin of {confidence:g} standard error{'s' * (confidence != 1)}"
                  if confidence else "")
        parts.append(f"at most {points:g} point{'s' * (points != 1)} lost{margin}")
    if "max_size_bytes" in budget:
        parts.append(f"at most {budget['max_size_bytes']:,.0f} bytes")
    if "max_latency_ms" in budget:
        parts.append(f"at most {budget['max_latency_ms']:g} ms")
    return ", ".join(parts)


def autocompress(model: nn.Module, ctx: CompressContext, raw: dict[str, Any], *,
                 recipe_dict: dict[str, Any], storage: str, executor: Executor | None = None,
                 worker_payload: Callable[[], dict[str, Any]] | None = None,
                 emit: Callable[[dict[str, Any]], None] = lambda event: None
                 ) -> tuple[dict[str, Any], StepResult | None, list[dict[str, Any]]]:
    """Search; return (the result's section, the recommended model or None, its chain).

    `worker_payload()` gives what a worker process rebuilds the baseline from (the recipe,
    the data and the baseline's bundle folder); it is asked for only with `workers` > 1."""
    cfg = validate_autocompress(raw)
    seed = recipe_dict.get("seed", 0) if cfg["seed"] is None else cfg["seed"]
    emit({"event": "stage", "stage": "autocompress",
          "message": "measuring each layer's sensitivity to fewer bits"})
    drops = layer_drops(model, ctx)
    search = Search(ctx, cfg, drops, baseline_of(model, ctx, cfg["runtime"]), emit=emit)

    def on_trial(record: dict[str, Any]) -> None:
        emit({"event": "candidate", **record, "trials": cfg["trials"]})
        emit({"event": "stage", "stage": "autocompress", "message": f"trial "
              f"{record['number'] + 1} of {cfg['trials']} finished"})

    def worker_args(name: str, worker_seed: int, quota: int, threads: int) -> tuple:
        payload = {**(worker_payload() if worker_payload else {}), "cfg": cfg, "drops": drops}
        return payload, storage, name, worker_seed, quota, threads

    emit({"event": "stage", "stage": "autocompress",
          "message": f"searching {cfg['trials']} compression chains"})
    name, records = run_search(search, storage=storage, name=cfg["study"], seed=seed,
                               baseline_key=fingerprint(recipe_dict), executor=executor,
                               worker_args=worker_args if worker_payload else None,
                               on_trial=on_trial)
    done = [r for r in records if r["state"] == "COMPLETE"]
    if not done:
        reasons = sorted({r.get("error", "") for r in records})
        raise_nothing(reasons)
    front = pareto_front(records, cfg["objective"])
    section: dict[str, Any] = {
        "study": name, "objective": cfg["objective"], "budget": cfg["budget"],
        "confidence": cfg["confidence"], "runtime": cfg["runtime"],
        "techniques": cfg["techniques"], "baseline_val_score": search.base.score,
        "trials": records, "front": front, "sensitivity": {k: {str(b): d for b, d in v.items()}
                                                           for k, v in drops.items()},
        "failed": [{"number": r["number"], "error": r["error"]} for r in records
                   if r["state"] != "COMPLETE"],
        "recommended": None}
    feasible = [r for r in done if r["meets_budget"]]
    if not feasible:
        section["message"] = closest_message(done, cfg)
        return section, None, []
    best = min(feasible, key=lambda r: (_cost(r, cfg["objective"]), r["metrics"]["drop"]))
    section["chosen_trial"] = best["number"]
    outcome = search.kept.get(best["number"])
    if outcome is None:  # found by a worker, or in an earlier session of the study
        emit({"event": "stage", "stage": "autocompress",
              "message": f"rebuilding trial {best['number']}'s model"})
        _, outcome = candidate(best["chain"], search)
    section["recommended"] = VARIANT
    return section, outcome, best["chain"]


def raise_nothing(reasons: list[str]) -> None:
    raise UserError("every auto-compress trial failed: "
                    + "; ".join(r.rstrip(".") for r in reasons if r)[:400]
                    + ". Allow other techniques (autocompress.techniques).")


def _cost(record: dict[str, Any], objective: str) -> float:
    m = record["metrics"]
    return m["size_bytes"] if objective == "size" else m["latency_ms"]


def closest_message(done: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """How close the best came, when no candidate met the budget."""
    budget = cfg["budget"]

    def overshoot(r: dict[str, Any]) -> float:
        m = r["metrics"]
        over = [m["drop"] / max(budget["max_drop"], 1e-3) - 1 if "max_drop" in budget else 0,
                m["size_bytes"] / budget.get("max_size_bytes", math.inf) - 1,
                m.get("latency_ms", 0) / budget.get("max_latency_ms", math.inf) - 1]
        return max(over)

    best = min(done, key=overshoot)
    m = best["metrics"]
    figures = [f"lost {m['drop'] * 100:.1f} points", f"{m['size_bytes']:,} bytes"]
    if "latency_ms" in m:
        figures.append(f"{m['latency_ms']:.4f} ms")
    return (f"No chain met the budget ({budget_text(budget, cfg['confidence'])}) in "
            f"{len(done)} trials; the closest, trial {best['number']}, "
            f"{', '.join(figures)}. Allow more trials or techniques, or loosen the budget.")


def layer_table(final: nn.Module | None, baseline: nn.Module) -> list[dict[str, Any]]:
    """Per layer of the baseline: its shape before and after, the weights kept, the bits
    per weight its distinct values need, and whether it was factorized."""
    rows = []
    found = dict(final.named_modules()) if final is not None else {}
    for name, layer in prunable(baseline):
        now = found.get(name)
        row: dict[str, Any] = {"layer": name, "shape": list(layer.weight.shape)}
        if now is None:
            row["now"] = "in the ONNX Runtime int8 file" if final is None else "removed"
        elif type(now).__name__ == "Factorized":
            inner = [m for m in now.modules() if hasattr(m, "weight")]
            row.update(now="factorized", rank=int(inner[0].weight.shape[0]))
        elif hasattr(now, "weight"):
            w = now.weight.detach()
            nonzero = w[w != 0]
            distinct = int(nonzero.unique().numel())
            row.update(now=list(w.shape), kept=float(nonzero.numel() / max(1, layer.weight
                                                                            .numel())),
                       bits=math.ceil(math.log2(distinct)) if 1 < distinct <= 256 else
                       (1 if distinct <= 1 else 32))
        rows.append(row)
    return rows


def finish(section: dict[str, Any], chain: list[dict[str, Any]], variant: dict[str, Any],
           baseline: dict[str, Any], final: nn.Module | None, baseline_model: nn.Module
           ) -> None:
    """The recommendation's explanation, from the variant's measured figures (after the
    harness timed it): words, the layers as data, and the replayable chain."""
    m, b = variant["metrics"], baseline["metrics"]
    key = score_key(m)
    drop = (b[key] - m[key]) * 100
    words = explain(chain)
    chosen = next(t for t in section["trials"] if t["number"] == section["chosen_trial"])
    val, se = chosen["metrics"]["drop"] * 100, chosen["metrics"].get("drop_se")
    spread = f" ± {se * 100:.1f}" if se is not None else ""
    budget = budget_text(section["budget"], section["confidence"])
    words.append(f"On the validation rows the search judged it on it lost {val:.1f}{spread} "
                 f"points (the budget: {budget}). It scores {m[key]:.4f} on the test rows "
                 f"({-drop:+.1f} points against the baseline's "
                 f"{b[key]:.4f}), ships in {m['size_bytes']:,} bytes "
                 f"({b['size_bytes'] / m['size_bytes']:.1f}x smaller than the baseline's "
                 f"{b['size_bytes']:,}) and runs in {m['latency_ms']:.4f} ms "
                 f"({m.get('speedup', 1):.2f}x the speed of {BASELINE_REFERENCE}).")
    if chosen["metrics"].get("speedup") is not None:
        words.append(f"In the search's own timing it ran at {chosen['metrics']['speedup']:.2f}x "
                     f"the speed of {chosen['metrics']['speedup_reference']}.")
    max_drop = section["budget"].get("max_drop")
    if max_drop is not None and drop > max_drop * 100 + 1e-9:
        words.append(f"On the test rows it lost {drop:.1f} points, more than the budget's "
                     f"{max_drop * 100:g}: the validation rows it was chosen on measure its "
                     f"drop only to within{spread or ' a few rows'} points; ask for a smaller "
                     f"loss, or bring more validation rows, for a firmer margin.")
    section["explanation"] = {"words": words, "layers": layer_table(final, baseline_model),
                              "chain": chain}
