"""Auto-compress against the fixed presets, on the same baselines, in one process.

    python -m engine bench --only autocompress      (or this file run directly)

Two baselines, each trained once per run from the same recipe and seed (so every row
starts from the same model): the digits MLP 64-300-100-10 (LeNet-300-100's shape), where
the search minimizes the shipped size within 1 point; and the built-in CNN on digits, where
it minimizes batch-1 latency within 1 point. Each fixed preset is one run of its chain;
the search is one run of the `autocompress` section. Every figure is the harness's: test
accuracy, the shipped file's bytes, latency at one thread in the variant's runtime, timed
in the same rounds as its baseline.

Targets (issue 19): MLP within 1 point and at least 40x smaller in at most 10 minutes on
two cores; CNN at least 1.5x faster in ONNX Runtime within 1 point; the search beats
every fixed preset at equal accuracy.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine
from engine.export import ort_call
from engine.latency import round_robin

MLP = {"seed": 0, "data": {"source": "builtin:digits"},
       "model": {"source": "builtin:mlp", "hidden": [300, 100]},
       "train": {"optimizer": "adam", "lr": 0.001, "epochs": 40, "early_stopping": None}}
CNN = {"seed": 0, "data": {"source": "builtin:shapes", "params": {"n_samples": 1500}},
       "model": {"source": "builtin:cnn"},
       "train": {"optimizer": "adam", "lr": 0.001, "epochs": 15, "early_stopping": None}}
MLP_PRESETS = {
    "Deep Compression (prune 90%, share 5-bit, Huffman)": [{"technique": "deep_compression"}],
    "prune 90% (lamp) -> share 4-bit": [
        {"technique": "prune", "amount": 0.9, "finetune_epochs": 20},
        {"technique": "share", "bits": 4, "finetune_epochs": 5}],
    "quantize static int8": [{"technique": "quantize", "method": "static_int8"}],
}
CNN_PRESETS = {
    "quantize static int8": [{"technique": "quantize", "method": "static_int8"}],
    "structured 50%": [
        {"technique": "prune", "method": "structured", "amount": 0.5, "finetune_epochs": 10}],
    "structured 50% -> static int8": [
        {"technique": "prune", "method": "structured", "amount": 0.5, "finetune_epochs": 10},
        {"technique": "quantize", "method": "static_int8"}],
    "lowrank SVD 25%": [{"technique": "lowrank", "rank_fraction": 0.25,
                         "finetune_epochs": 10}],
}


def _row(label: str, m: dict, base: dict, seconds: float, onnx: float | None) -> str:
    delta = (m["test_accuracy"] - base["test_accuracy"]) * 100
    return (f"| {label} | {m['test_accuracy']:.4f} | {delta:+.1f} | {m['size_bytes']:,} | "
            f"{base['size_bytes'] / m['size_bytes']:.1f}x | {m['latency_ms']:.4f} | "
            f"{m.get('speedup', 1.0):.2f}x | {m['runtime']} | "
            f"{f'{onnx:.2f}x' if onnx else ''} | {seconds:.0f} |")


def compare(base: dict, presets: dict, auto: dict, storage: str, tmp: str) -> list[str]:
    """One run per preset and one search, all with `export.onnx` so that every variant's
    deployable .onnx (preprocessing inside) is timed at the end beside the baseline's, in
    the same rounds: the "vs ONNX fp32" column, each variant against the baseline there."""
    rows: list[tuple[str, dict, dict, float]] = []
    files: dict[str, bytes] = {}
    start = time.perf_counter()
    for label, extra in [*((k, {"compress": v}) for k, v in presets.items()),
                         (f"**auto-compress** ({auto['objective']}, {auto['trials']} trials)",
                          {"autocompress": auto})]:
        out = Path(tmp) / f"run{len(rows)}"
        t = time.perf_counter()
        result = engine.run({**base, **extra, "export": {"onnx": True}}, out_dir=out,
                            storage=storage)
        seconds = time.perf_counter() - t
        if not files:
            files["baseline"] = (out / "baseline" / "model.onnx").read_bytes()
            rows.append(("baseline", result["variants"][0]["metrics"], {}, 0.0))
        last = result["variants"][-1]
        if len(result["variants"]) == 1:  # a search that recommended nothing
            rows.append((label, {}, result, seconds))
            continue
        files[label] = (out / last["metrics"]["deploy"]["file"]).read_bytes()
        rows.append((label, last["metrics"], result, seconds))
    shape = tuple(rows[1][2]["data"]["input_shape"])
    figures = round_robin({k: ort_call(v, shape) for k, v in files.items()})
    lines = ["| variant | test acc | Δ points | bytes | smaller | latency ms | speedup | "
             "runtime | vs baseline in ONNX fp32 | run s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    first = rows[0][1]
    words: list[str] = []
    for label, m, result, seconds in rows:
        if not m:
            words.append(f"auto-compress: {result['autocompress']['message']}")
            continue
        onnx = (figures["baseline"]["median_ms"] / figures[label]["median_ms"]
                if label != "baseline" else None)
        lines.append(_row(label, m, first, seconds, onnx))
        if result and result.get("autocompress"):
            words = result["autocompress"]["explanation"]["words"]
    lines += ["", *(f"- {w}" for w in words),
              f"\n(all rows: {time.perf_counter() - start:.0f} s; the last column: each "
              f"variant's deployable .onnx against the baseline's, ONNX Runtime, "
              f"{figures['baseline']['threads']} thread, same rounds)"]
    return lines


def autocompress_section(quick: bool = False) -> str:
    trials = 12 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/studies.db"
        out = ["### Digits MLP 64-300-100-10: the smallest within 1 point", ""]
        out += compare(MLP, MLP_PRESETS, {"budget": {"max_drop": 0.01}, "objective": "size",
                                          "trials": trials}, storage, tmp)
        out += ["", "### Built-in CNN on shapes (3x32x32, 1,500 images): the fastest within "
                "1 point", ""]
        out += compare(CNN, CNN_PRESETS, {"budget": {"max_drop": 0.01},
                                          "objective": "latency", "trials": trials // 2},
                       storage, tmp)
    return "\n".join(out)


if __name__ == "__main__":
    print(autocompress_section("--quick" in sys.argv))
