"""Every compression technique on the digits MLP: accuracy, shipped size and latency.

Each row starts from the same baseline (same recipe and seed, so the same trained model)
and applies one technique, or the Deep Compression chain. Sizes are the files that ship:
the `.wbz` weights file for PyTorch variants, the `.onnx` file for ONNX Runtime ones (their
ratio is against the float32 `.onnx`). Latency is the median at batch 1 on the same
harness as the baseline, in the runtime named.

    python tests/benchmarks/bench_compress.py [--epochs 40] [--hidden 300 100]

Targets (issue 4): magnitude pruning at 90% with fine-tuning, static int8 at least 3.5x
smaller and the Deep Compression chain at least 20x smaller, each within 1 point of the
baseline's accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine
from engine.latency import machine

STEPS = {
    # lamp, the default scope (bench_prune_scope.py compares the scopes over three seeds)
    "prune magnitude 90%": {"technique": "prune", "method": "magnitude", "amount": 0.9,
                            "scope": "lamp", "finetune_epochs": 20},
    "prune magnitude 90% per layer": {"technique": "prune", "method": "magnitude",
                                      "amount": 0.9, "scope": "layer", "finetune_epochs": 20},
    "prune magnitude 90% gradual": {"technique": "prune", "method": "magnitude",
                                    "amount": 0.9, "schedule": "gradual", "scope": "layer",
                                    "finetune_epochs": 12},
    "prune random 90%": {"technique": "prune", "method": "random", "amount": 0.9,
                         "scope": "layer", "finetune_epochs": 10},
    "prune obd 90%": {"technique": "prune", "method": "obd", "amount": 0.9, "scope": "layer",
                      "finetune_epochs": 10},
    "prune structured 50%": {"technique": "prune", "method": "structured", "amount": 0.5,
                             "finetune_epochs": 10},
    "quantize dynamic int8": {"technique": "quantize", "method": "dynamic_int8"},
    "quantize static int8": {"technique": "quantize", "method": "static_int8"},
    "quantize static int8 per-tensor": {"technique": "quantize", "method": "static_int8",
                                        "per_channel": False},
    "quantize fp16": {"technique": "quantize", "method": "fp16"},
    "quantize uniform 4-bit": {"technique": "quantize", "method": "uniform", "bits": 4},
    "quantize log 4-bit": {"technique": "quantize", "method": "log", "bits": 4},
    "quantize qat 4-bit": {"technique": "quantize", "method": "qat", "bits": 4,
                           "finetune_epochs": 5},
    "distill to half width": {"technique": "distill", "width_multiplier": 0.5, "epochs": 40},
    "lowrank svd 25%": {"technique": "lowrank", "method": "svd", "rank_fraction": 0.25,
                        "finetune_epochs": 10},
    "lowrank nmf 25%": {"technique": "lowrank", "method": "nmf", "rank_fraction": 0.25,
                        "finetune_epochs": 10},
    "share 5-bit + Huffman": {"technique": "share", "bits": 5, "finetune_epochs": 5},
    "Deep Compression": {"technique": "deep_compression"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, nargs="+", default=[300, 100],
                        help="hidden widths; 300 100 is LeNet-300-100, Han et al.'s MLP")
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info['processor']}, torch {info['torch']}, {info['threads']} threads")
    base = {"seed": 0, "data": {"source": "builtin:digits"},
            "model": {"source": "builtin:mlp", "hidden": args.hidden},
            "train": {"optimizer": "adam", "lr": 0.001, "epochs": args.epochs,
                      "early_stopping": None}}
    baseline = engine.run(base)["variants"][0]["metrics"]
    acc0 = baseline["test_accuracy"]
    print(f"baseline: test accuracy {acc0:.4f}, {baseline['size_bytes']} bytes (.wbz), "
          f"{baseline['latency_ms']:.4f} ms\n")
    print(f"{'variant':<30} {'acc':>7} {'Δ pts':>6} {'bytes':>8} {'smaller':>8} "
          f"{'latency ms':>10} {'speedup':>8} runtime")
    for label, step in STEPS.items():
        m = engine.run({**base, "compress": [step]})["variants"][1]["metrics"]
        delta = (m["test_accuracy"] - acc0) * 100
        flag = "  (smaller, not faster)" if m.get("smaller_not_faster") else ""
        print(f"{label:<30} {m['test_accuracy']:>7.4f} {delta:>+6.1f} {m['size_bytes']:>8} "
              f"{m.get('size_ratio', 0):>7.1f}x {m['latency_ms']:>10.4f} "
              f"{m.get('speedup', 0):>7.2f}x {m['runtime']}{flag}")


if __name__ == "__main__":
    main()
