"""Compression techniques: one module per family, one registry of stable names.

A recipe's `compress` list is a chain: each step starts from the previous step's model and
yields a variant that the runner evaluates, measures and stores. `resolve_chain` checks the
steps against the registry and fills their defaults; `run_chain` runs them, the one loop
that the runner and a search share. Families register themselves in `COMPRESSORS` when
their module is imported, which this package does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

# the families register in this order, the order of every menu
# isort: off
from engine.compress import prune, quantize, distill, lowrank, share, presets  # noqa: F401
# isort: on
from engine.compress.base import (
    COMPRESSORS,
    CompressContext,
    StepResult,
    clone,
    prunable,
)
from engine.errors import UserError
from engine.registry import Registry

__all__ = ["COMPRESSORS", "CompressContext", "StepResult", "clone", "describe_step",
           "load_all", "prunable", "resolve_chain", "run_chain", "step_name"]


def load_all() -> Registry:
    """The registry with every family in it (all are imported with this package)."""
    return COMPRESSORS


def resolve_chain(steps: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    """Each step's settings checked and its defaults filled in; a step whose method yields
    an ONNX Runtime model must come last."""
    out = []
    for i, step in enumerate(steps):
        where = f"compress[{i}]"
        if not isinstance(step, dict) or "technique" not in step:
            raise UserError(f"{where} must be an object with a 'technique' key, such as "
                            f'{{"technique": "prune", "amount": 0.8}}.')
        entry = COMPRESSORS.get(step["technique"])
        params = entry.resolve({k: v for k, v in step.items() if k != "technique"}, where)
        last = i == len(steps) - 1
        if params.get("method") in entry.extra.get("terminal_methods", ()) and not last:
            raise UserError(f"{where}: {step['technique']} {params['method']} yields an ONNX "
                            f"Runtime model that later steps cannot change; put it last in "
                            f"the chain.")
        out.append({"technique": step["technique"], **params})
    return tuple(out)


def run_chain(model: nn.Module, steps: Sequence[dict[str, Any]], ctx: CompressContext
              ) -> Iterator[tuple[int, dict[str, Any], StepResult]]:
    """Run the chain: yield (index, step, result) as each step finishes. Each step starts
    from the previous step's model (a step yielding an ONNX Runtime model ends the chain's
    PyTorch line, which `resolve_chain` puts last)."""
    current = model
    for i, step in enumerate(steps):
        entry = COMPRESSORS.get(step["technique"])
        outcome = entry.fn(current, {k: v for k, v in step.items() if k != "technique"}, ctx)
        if outcome.model is None and outcome.source is None:
            outcome.source = current  # an ONNX Runtime variant counts its own weights
        yield i, step, outcome
        if outcome.model is not None:
            current = outcome.model


def step_name(step: dict[str, Any], used: set[str]) -> str:
    """A variant is named after its step: `prune-magnitude`, `share`, `prune-magnitude-2`."""
    base = step["technique"] + (f"-{step['method']}" if step.get("method") else "")
    name, k = base, 2
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


def describe_step(step: dict[str, Any]) -> str:
    """One line for hover texts and tables: `prune magnitude amount=0.9`."""
    shown = [step["technique"], str(step.get("method", ""))]
    params = ({p.name: p for p in COMPRESSORS.get(step["technique"]).params}
              if step["technique"] in COMPRESSORS.names() else {})
    for key in ("amount", "bits", "rank_fraction", "temperature", "width_multiplier"):
        if key in step and (key not in params or params[key].applies(step)):
            shown.append(f"{key}={step[key]}")  # not a setting its method ignores
    if step.get("layer_bits"):  # mixed precision: the range of widths the layers got
        widths = sorted(set(step["layer_bits"].values()))
        shown.append(f"layer_bits={widths[0]}-{widths[-1]}")
    if step.get("energy"):
        shown.append(f"energy={step['energy']}")
    return " ".join(s for s in shown if s)
