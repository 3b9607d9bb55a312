"""What Compare and the report show, as plain records: every variant of a set of runs, the
accuracy/size/latency table, the runs grouped by the data they were scored on, and one
line per technique a stakeholder can read. `engine.report` writes these as HTML; the
Compare page places them; tests assert on them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from engine import plots
from engine.compress import COMPRESSORS
from engine.metrics import SCORE_KEYS, score_key
from engine.recipe import short_source
from engine.showcase import display_name
from engine.store import Store

TRAINING_ONLY = ("compress", "sensitivity", "name", "diagnose", "export")
# where every figure of the table comes from, said once for the page and the report
SOURCES = ("Sizes are the files that ship: the .wbz of a PyTorch variant, the .onnx of an "
           "ONNX Runtime one; \"smaller by\" is against the baseline's .wbz, or for an ONNX "
           "Runtime variant against the same model as a float32 .onnx. Latency is the median "
           "at batch 1 in the runtime in brackets, every variant of a run timed once, in the "
           "same rounds, at the thread count shown; \"speedup vs baseline\" divides the "
           "baseline's latency by the variant's, both as shown. Fidelity is how closely a "
           "variant follows the baseline on the test rows (a classifier's top-1 agreement "
           "with the baseline's predictions, else the mean cosine of the outputs): a "
           "variant can keep its accuracy while its answers drift; retrieval@10 agreement, "
           "for a label-free embedder, is the share of each test row's 10 nearest rows it "
           "still finds.")
METRIC_KEYS = ("size_bytes", "latency_ms", "test_agreement", "test_accuracy", "test_r2",
               "test_fidelity", "test_retrieval_at_10",
               "size_ratio", "speedup",
               "smaller_not_faster", "nonzero_params", "params", "runtime", "latency_threads",
               "speedup_vs_onnx_fp32")

# the columns that say how closely a variant's outputs follow the baseline's (measure.fidelity)
FIDELITY_COLUMNS = {"test_fidelity": "fidelity (vs baseline)",
                    "test_retrieval_at_10": "retrieval@10 agreement"}


def _training_key(recipe: dict[str, Any]) -> str:
    """What decides a run's baseline: the recipe without its compression and reporting."""
    kept = {k: v for k, v in (recipe or {}).items() if k not in TRAINING_ONLY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def run_label(run: dict[str, Any]) -> str:
    """The name a run goes by in plots and tables (a showcase run's key left out)."""
    return display_name(run.get("name")) or run["id"][:6]


def variant_points(store: Store, run_ids: Sequence[str], *, one_baseline: bool = True
                   ) -> list[dict[str, Any]]:
    """One record per stored variant of the runs, finished or still running: run, run_id,
    name, technique, chain and the metrics the plots and tables use. With `one_baseline`,
    a baseline trained by the same training recipe as one already listed is left out (runs
    that compress the same seeded model each train it again)."""
    points, seen = [], set()
    for run_id in run_ids:
        run = store.get_run(run_id)
        if run is None:
            continue
        trained = _training_key(run["recipe"])
        for v in store.variants(run_id):
            if v["name"] == "baseline" and one_baseline:
                if trained in seen:
                    continue
                seen.add(trained)
            m = v["metrics"]
            points.append({"run": run_label(run), "run_id": run_id, "name": v["name"],
                           "technique": v["technique"], "position": v["position"],
                           "chain": f"{m.get('chain', '')} [{m.get('runtime', 'torch')}]",
                           **{k: m.get(k) for k in METRIC_KEYS}})
    return points


def score_metric(points: Sequence[dict[str, Any]]) -> str:
    """`test_agreement` when any variant has it (a label-free run), else `test_accuracy`
    (classification), else `test_r2`."""
    found = {score_key(p) for p in points}
    return next((k for k in SCORE_KEYS if k in found), "test_r2")


def table_records(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accuracy/size/latency table, one row per variant, units in the column names."""
    metric = score_metric(points)
    front = {(r["run_id"], r["name"]) for r in plots.pareto_records(points, "size_bytes", metric)
             if r["pareto"]}
    fidelity = [k for k in ("test_fidelity", "test_retrieval_at_10")
                if any(p.get(k) is not None for p in points)]
    return [{"run": p["run"], "variant": p["name"], "chain": p["chain"],
             metric.replace("_", " "): _round(p.get(metric), 4),
             **{FIDELITY_COLUMNS[k]: _round(p.get(k), 4) for k in fidelity},
             "size (KiB)": _round(p["size_bytes"] / 1024, 2) if p.get("size_bytes") else None,
             "smaller by (x)": _round(p.get("size_ratio"), 2),
             "latency p50 (ms, batch 1)": _round(p.get("latency_ms"), 4),
             "threads": p.get("latency_threads"),
             "speedup (x, vs baseline)": _round(p.get("speedup"), 2),
             "speedup (x, vs ONNX fp32)": _round(p.get("speedup_vs_onnx_fp32"), 2),
             "smaller but not faster": bool(p.get("smaller_not_faster")),
             "Pareto-optimal (size)": (p["run_id"], p["name"]) in front} for p in points]


def training_histories(store: Store, run_ids: Sequence[str]) -> dict[str, dict[str, list]]:
    """Each distinct baseline's per-epoch history, keyed by run label (an optimizer race
    overlays here)."""
    out, seen = {}, set()
    for run_id in run_ids:
        run = store.get_run(run_id)
        key = _training_key(run["recipe"]) if run else None
        if run is None or key in seen:
            continue
        seen.add(key)
        history = store.history(run_id)
        if history.get("epoch"):
            out[run_label(run)] = history
    return out


def variant_recipe(recipe: dict[str, Any], position: int) -> dict[str, Any]:
    """The recipe that makes variant number `position` (0 = the baseline): the chain cut
    after that step."""
    out = copy.deepcopy(recipe)
    out["compress"] = list(out.get("compress") or [])[:position]
    out["autocompress"] = None  # a chain's variant replays without the search
    return out


def figures(store: Store, run_ids: Sequence[str]) -> dict[str, Any]:
    """The main figures by name: pareto_size, pareto_latency, training_loss (those with
    data); what the report draws first and `export_png` saves."""
    points = variant_points(store, run_ids)
    metric = score_metric(points)
    descriptions = technique_descriptions()
    out = {}
    if points:
        out["pareto_size"] = plots.pareto(points, "size_bytes", metric,
                                          descriptions=descriptions)
        out["pareto_latency"] = plots.pareto(points, "latency_ms", metric,
                                             descriptions=descriptions)
    histories = training_histories(store, run_ids)
    if histories:
        out["training_loss"] = plots.curves(histories, "loss", title="training: loss per epoch")
    return out


def technique_descriptions() -> dict[str, str]:
    """Each compression technique's one-sentence description, from its registry."""
    return {e.name: e.description for e in COMPRESSORS}


def _round(value: Any, digits: int) -> Any:
    return None if value is None else round(float(value), digits)


def data_key(recipe: dict[str, Any]) -> str:
    """What a run was scored on: the data section's source, target, task and settings; runs
    with different keys cannot share a front (a score on one dataset says nothing of
    another's)."""
    data = recipe.get("data") or {}
    kept = {k: data.get(k) for k in ("source", "target", "task", "params", "image_size",
                                     "feature_selection", "missing")}
    return json.dumps(kept, sort_keys=True, default=str)


def data_groups(store: Store, run_ids: Sequence[str]) -> dict[str, list[str]]:
    """The runs grouped by the data they were scored on, in the order given, each group
    under a label a person reads: `digits`, or `moons (noise=0.3)` where two groups would
    otherwise read the same."""
    groups: dict[str, list[str]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for run_id in run_ids:
        run = store.get_run(run_id)
        if run is not None:
            key = data_key(run["recipe"])
            groups.setdefault(key, []).append(run_id)
            recipes[key] = run["recipe"]["data"]
    labels = {key: short_source(recipes[key]["source"]) for key in groups}
    out = {}
    for key, ids in groups.items():
        label = labels[key]
        if list(labels.values()).count(label) > 1:
            extra = {k: v for k, v in (recipes[key].get("params") or {}).items()}
            if recipes[key].get("target"):
                extra["target"] = recipes[key]["target"]
            label += f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else \
                f" ({len(out) + 1})"
        out[label] = ids
    return out


def headline(store: Store, run_ids: Sequence[str]) -> list[str]:
    """One line per compressed variant that a stakeholder can read, against its own run's
    baseline: `prune-magnitude (prune 80% · mlp on digits): 4.2x smaller, -0.6 points, not
    faster`."""
    lines = []
    for run_id in run_ids:
        run = store.get_run(run_id)
        variants = store.variants(run_id) if run is not None else []
        if len(variants) < 2:
            continue
        base = variants[0]["metrics"]
        metric = score_key(base) or "test_r2"
        for v in variants[1:]:
            m, said = v["metrics"], []
            if m.get("size_ratio"):
                said.append(f"{m['size_ratio']:.1f}x smaller" if m["size_ratio"] >= 1 else
                            f"{1 / m['size_ratio']:.1f}x larger")
            if m.get(metric) is not None and base.get(metric) is not None:
                delta = m[metric] - base[metric]
                said.append(f"R² {delta:+.3f}" if metric == "test_r2"
                            else f"{100 * delta:+.1f} points")
            speed = m.get("speedup")
            if speed:
                said.append(f"{speed:.1f}x faster" if speed >= 1.05 else
                            f"{1 / speed:.1f}x slower" if speed <= 0.95 else "not faster")
            lines.append(f"{v['name']} ({run_label(run)}): {', '.join(said) or 'measured'}")
    return lines


def default_selection(runs: Sequence[dict[str, Any]], store: Store, *, most: int = 8
                      ) -> list[str]:
    """The runs Compare opens on, from `runs` newest first: the whole group of the newest
    finished run when it has one (a showcase, a race, a side-by-side comparison), else the
    newest runs with a compression chain scored on the same data as the newest of them."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return []
    newest = done[0]
    if newest.get("group_id"):
        return [r["id"] for r in runs if r.get("group_id") == newest["group_id"]][:most]
    chains = [r for r in done if len(store.variants(r["id"])) > 1] or done
    key = data_key(chains[0]["recipe"])
    return [r["id"] for r in chains if data_key(r["recipe"]) == key][:most]
