"""Inference: PyTorch eager vs ONNX Runtime float32 vs ONNX Runtime int8, MLP and CNN.

Each model is trained briefly on `digits`, exported with its preprocessing inside, and
statically quantized to int8; every figure comes from the same harness (warm-up, then
timed calls): median and p95 at batch 1, and rows per second at batch 256, one thread.

    python tests/benchmarks/bench_deploy.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import deploy
from engine.compress.onnx_int8 import quantize_onnx
from engine.data import load_data
from engine.export import compact, onnx_bytes
from engine.latency import machine
from engine.models import build_model
from engine.runner import resolve
from engine.train import to_tensors, train


def measure(archs: tuple[str, ...] = ("mlp", "cnn"), epochs: int = 15) -> list[dict]:
    """One row per model and runtime: accuracy, p50/p95 ms at batch 1, rows/s at 256."""
    torch.set_num_threads(1)  # one thread for every runtime, so the figures compare
    out = []
    for arch in archs:
        recipe = resolve({"data": {"source": "builtin:digits"},
                                   "model": {"source": f"builtin:{arch}"},
                                   "train": {"epochs": epochs, "early_stopping": None}})
        data = load_data(recipe.data, seed=0)
        model = build_model(recipe.model, data.input_shape, data.n_classes, seed=0)
        tensors = to_tensors(data, torch.device("cpu"))
        train(model, data, recipe.train, device=torch.device("cpu"), seed=0, tensors=tensors)
        fp32 = deploy.export_model(model, data)
        core = compact(onnx_bytes(model, data.input_shape))
        int8_core, _ = quantize_onnx(core, method="static_int8", per_channel=True,
                                     calibration=tensors["X_train"][:512])
        int8 = deploy.with_preprocessing(int8_core, data)
        float_report = deploy.report(fp32, data, model=model)
        int8_report = deploy.report(int8, data)
        eager = float_report["latency"]["torch_eager"]
        for runtime, acc, t in [
                ("PyTorch eager", float_report["torch"]["accuracy"], eager),
                ("ORT float32", float_report["onnx"]["accuracy"],
                 float_report["latency"]["onnxruntime_cpu"]),
                ("ORT int8 static", int8_report["onnx"]["accuracy"],
                 int8_report["latency"]["onnxruntime_cpu"])]:
            out.append({"model": arch, "runtime": runtime, "accuracy": acc,
                        "p50_ms": t["median_ms"], "p95_ms": t["p95_ms"],
                        "rows_per_s": t["throughput_per_s"],
                        "p50_vs_eager": eager["median_ms"] / t["median_ms"],
                        "rows_vs_eager": t["throughput_per_s"] / eager["throughput_per_s"]})
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    info = machine()
    print(f"machine: {info['processor']}, {info['platform']}, torch {info['torch']}, "
          f"1 thread\n")
    print(f"{'model':<5} {'runtime':<16} {'acc':>6} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'rows/s @256':>12} {'p50 vs eager':>13} {'rows/s vs eager':>16}")
    for r in measure():
        print(f"{r['model']:<5} {r['runtime']:<16} {r['accuracy']:>6.3f} {r['p50_ms']:>8.4f} "
              f"{r['p95_ms']:>8.4f} {r['rows_per_s']:>12.0f} {r['p50_vs_eager']:>12.2f}x "
              f"{r['rows_vs_eager']:>15.2f}x")


if __name__ == "__main__":
    main()
