"""A run's progress as one bar: how far it is, in a line that says which stage it is in.

The store keeps a summary of each run's latest events (`progress`: the stage, the epoch,
a diagnostic's done/total, the compression step, trials so far); `progress_of` turns it
into the fraction and the text the sidebar and every live view show, so a search, a
compression chain and a diagnosis move their bars too, not only the first training.
"""

from __future__ import annotations

from typing import Any


def progress_of(run: dict[str, Any]) -> tuple[float, str]:
    """(fraction done in [0, 1], a line naming the run and its stage)."""
    p = run.get("progress") or {}
    name, status = run.get("name") or run["id"][:6], run["status"]
    if status == "queued":
        waiting = run.get("claimed") is None
        return 0.0, f"{name} · queued" + (": waiting for a free worker" if waiting else "")
    if status != "running":
        return 1.0 if status == "done" else 0.0, f"{name} · {status}"
    stage = p.get("stage")
    epoch, epochs = p.get("epoch", 0), p.get("epochs") or 0
    if stage == "tune":
        total = ((run.get("recipe") or {}).get("tune") or {}).get("n_trials")
        done = p.get("trials", 0)
        return (_part(done, total), f"{name} · searching: {done} of {total or '?'} trials")
    if stage == "diagnose" and p.get("total"):
        return _part(p.get("done", 0), p["total"]), f"{name} · {p.get('message', 'diagnosing')}"
    if stage == "compress" and p.get("steps"):
        step, steps = p.get("step", 1), p["steps"]
        within = _part(epoch, epochs) if p.get("variant") not in (None, "baseline") else 0.0
        return ((step - 1 + within) / steps,
                f"{name} · {p.get('message', f'step {step} of {steps}')}")
    if stage in ("train", None) and epochs:
        return _part(epoch, epochs), f"{name} · training: epoch {epoch} of {epochs}"
    return 0.0, f"{name} · {p.get('message') or stage or 'starting'}"


def _part(done: float, total: float | None) -> float:
    return min(max(done / total, 0.0), 1.0) if total else 0.0
