"""`python -m engine ...`: run a recipe headless, list what can be picked.

    python -m engine run assets/recipes/digits_mlp.json --out runs/digits
    python -m engine list            # every registry, with parameters
    python -m engine list optimizers --json
    python -m engine worker RUN_ID --store URL   # what the app starts for a background run
    python -m engine zygote SOCKET --parent PID  # forks those workers with the engine loaded
    python -m engine bench [--quick]             # the performance suite's tables

A user's mistake ends with one line `error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine import zygote
from engine.errors import UserError
from engine.metrics import score_key
from engine.recipe import load_recipe
from engine.runner import registries, resolve, run
from engine.settings import store_url
from engine.worker import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine",
                                     description="Model optimization workbench, headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run a recipe and write DIR/result.json")
    run_p.add_argument("recipe", help="a recipe file (.json, .yaml)")
    run_p.add_argument("--out", required=True, help="folder for result.json and model files")
    run_p.add_argument("--quiet", action="store_true", help="no progress bar")
    list_p = sub.add_parser("list", help="list datasets, models, optimizers, schedules, ...")
    list_p.add_argument("kind", nargs="?", help="one registry, e.g. optimizers")
    list_p.add_argument("--json", action="store_true", help="machine-readable output")
    worker_p = sub.add_parser("worker", help="run one stored run in the background "
                                             "(used by the app; see engine/jobs.py)")
    worker_p.add_argument("run_id", help="the run's id in the store")
    worker_p.add_argument("--store", required=True, help="the store's SQLAlchemy URL")
    worker_p.add_argument("--artifacts", help="the folder of the runs' files (default: "
                                              "WORKBENCH_ARTIFACTS or runs/artifacts)")
    worker_p.add_argument("--threads", type=int, help="torch threads for this run")
    zygote_p = sub.add_parser("zygote", help="fork workers from one process that has "
                                             "imported the engine (used by the app; see "
                                             "engine/zygote.py)")
    zygote_p.add_argument("socket", help="the Unix socket to listen on")
    zygote_p.add_argument("--parent", type=int, required=True,
                          help="the pid whose end ends the zygote")
    sub.add_parser("bench", help="print the performance suite's tables "
                                 "(tests/benchmarks/suite.py; bench --help for options)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the suite parses its own options
        try:
            return _bench(argv[1:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.recipe, args.out, quiet=args.quiet)
        if args.command == "zygote":
            return zygote.serve(args.socket, args.parent)
        if args.command == "worker":
            return run_worker(args.run_id, args.store, artifacts=args.artifacts,
                              threads=args.threads)
        return _list(args.kind, as_json=args.json)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _bench(options: list[str]) -> int:
    """The suite lives with the other benchmark scripts, in the repository's tests/."""
    path = Path(__file__).resolve().parents[1] / "tests" / "benchmarks" / "suite.py"
    if not path.is_file():
        raise UserError(f"the benchmark suite is not here ({path}); run `python -m engine "
                        f"bench` from a checkout of the repository.")
    spec = importlib.util.spec_from_file_location("workbench_bench_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite.main(options)


def _run(recipe_path: str, out: str, *, quiet: bool) -> int:
    recipe = resolve(load_recipe(recipe_path))
    bar = None if quiet else _ProgressBar(recipe.train.epochs)
    try:
        result = run(recipe, out_dir=out, on_progress=bar, storage=store_url())
    finally:
        if bar is not None:
            bar.close()
    for variant in result["variants"]:
        m = variant["metrics"]
        key = score_key(m)
        name = {"test_agreement": "test agreement", "test_accuracy": "test accuracy"}.get(
            key, "test R²")
        score = f"{name} {m[key]:.4f}" if key else "not scored"
        print(f"{variant['name']}: {score}, {m['params']} parameters, "
              f"{m['size_bytes']} bytes, {m['latency_ms']:.3f} ms at batch 1")
    print(f"wrote {out}/result.json")
    return 0


class _ProgressBar:
    """tqdm over epochs on stderr, fed by the engine's progress events."""

    def __init__(self, epochs: int) -> None:
        self.bar = tqdm(total=epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            self.bar.update(1)
            shown = {k: f"{v:.4g}" for k, v in event.items()
                     if k in ("train_loss", "val_loss", "val_accuracy", "val_r2")}
            self.bar.set_postfix(shown)
        elif event["event"] == "stage":
            self.bar.set_description(event["stage"])

    def close(self) -> None:
        self.bar.close()


def _list(kind: str | None, *, as_json: bool) -> int:
    regs = registries()
    if kind is not None:
        if kind not in regs:
            raise UserError(f"there is no registry {kind!r}; choose one of: {', '.join(regs)}.")
        regs = {kind: regs[kind]}
    if as_json:
        print(json.dumps({k: r.to_dict() for k, r in regs.items()}, indent=2))
        return 0
    for reg in regs.values():
        print(f"{reg.kind.upper()}: {reg.description}")
        for entry in reg:
            print(f"  {entry.name:<16} {entry.description}")
            if "uses" in entry.extra:
                print(f"      settings: model.{', model.'.join(entry.extra['uses'])}")
            if "default_lr" in entry.extra:
                print(f"      default train.lr: {entry.extra['default_lr']}")
            for p in entry.params:
                bounds = ""
                if p.choices:
                    bounds = f" one of {list(p.choices)}"
                elif p.low is not None or p.high is not None:
                    bounds = f" in [{p.low if p.low is not None else '-inf'}, " \
                             f"{p.high if p.high is not None else 'inf'}]"
                print(f"      {p.name} ({p.type}, default {p.default!r}{bounds}): {p.help}")
        print()
    return 0
