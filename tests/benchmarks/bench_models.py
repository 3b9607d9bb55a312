"""Real architectures in ONNX Runtime: a ResNet-18 and a MobileNetV2 (transformers configs,
random init, 1000 classes, 224x224 RGB; 112x112 with --quick), each as float32, static
int8 (QOperator, per channel, 32 calibration images) and structured-pruned at 50% of the
channels of every coupled group (Torch-Pruning). Latency at batch 1 and throughput at batch
32, one ONNX Runtime thread, every figure under the latency harness's time budget with its
call count, and the file sizes.

    python -m engine bench --only models [--quick]
    python tests/benchmarks/bench_models.py [--quick]
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

from engine.compress.channels import channel_prune  # noqa: E402
from engine.compress.onnx_int8 import quantize_onnx  # noqa: E402
from engine.export import onnx_bytes, ort_call, ort_session  # noqa: E402
from engine.latency import round_robin, time_calls  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.recipe import ModelConfig  # noqa: E402

ARCHS = ("resnet-18", "mobilenet_v2-1.0")
BATCH = 32


def cpu_int8_support() -> str:
    """What this CPU offers int8 kernels: VNNI (and AMX) or plain AVX2."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx2") if f in flags]
    return ", ".join(found) or "no AVX2"


def _model(name: str, size: int) -> torch.nn.Module:
    if name == "mobilenet_v2-1.0":  # the real width; the app's list has a 0.35 one
        from engine.hf import build_hf

        return build_hf({"kind": "hf", "config": {"model_type": "mobilenet_v2",
                                                  "depth_multiplier": 1.0, "num_labels": 1000,
                                                  "num_channels": 3},
                         "mean": [0.0] * 3, "std": [1.0] * 3}).eval()
    return build_model(ModelConfig(source=f"hfarch:{name}"), (3, size, size), 1000,
                       seed=0).eval()


def measure(quick: bool = False) -> list[dict]:
    size = 112 if quick else 224
    shape = (3, size, size)
    rows = []
    for name in ARCHS:
        torch.manual_seed(0)
        start = time.perf_counter()
        model = _model(name, size)
        pruned, _ = channel_prune(model, 0.5, "l1", types.SimpleNamespace(input_shape=shape))
        fp32 = onnx_bytes(model, shape)
        calibration = torch.rand(32, *shape)
        int8, _ = quantize_onnx(fp32, method="static_int8", per_channel=True,
                                calibration=calibration)
        files = {"float32": fp32, "static int8": int8,
                 "structured 50%": onnx_bytes(pruned.eval(), shape)}
        batch1 = round_robin({k: ort_call(f, shape) for k, f in files.items()}, budget_s=4.0)
        many = np.random.default_rng(0).random((BATCH, *shape), dtype=np.float32)
        for variant, blob in files.items():
            session = ort_session(blob, threads=1)
            feed = {session.get_inputs()[0].name: many}
            bulk = time_calls(lambda s=session, f=feed: s.run(None, f), repeats=20,
                              warmup=2, budget_s=8.0)
            rows.append({"model": name, "variant": variant, "bytes": len(blob),
                         "params": (sum(p.numel() for p in (pruned if "structured" in variant
                                                            else model).parameters())),
                         "p50_ms": batch1[variant]["median_ms"],
                         "calls": batch1[variant]["calls"],
                         "rows_per_s": BATCH / (bulk["median_ms"] / 1e3),
                         "batch_calls": bulk["calls"]})
        base = rows[-3]
        for r in rows[-3:]:
            r["speedup"] = base["p50_ms"] / r["p50_ms"]
            r["throughput_x"] = r["rows_per_s"] / base["rows_per_s"]
        rows[-1]["seconds"] = time.perf_counter() - start
    return rows


def markdown(rows: list[dict], quick: bool) -> str:
    lines = [f"ONNX Runtime, 1 thread, {'112' if quick else '224'} px, random init, 1000 "
             f"classes; CPU int8 support: {cpu_int8_support()}.", "",
             "| model | variant | params | file | p50 ms @1 | vs fp32 | rows/s @32 | vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {r['p50_ms']:.1f} ({r['calls']} calls) | "
                     f"{r['speedup']:.2f}x | {r['rows_per_s']:.1f} ({r['batch_calls']} calls) | "
                     f"{r['throughput_x']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(markdown(measure(quick), quick))
