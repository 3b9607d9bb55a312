"""Epoch time: the engine's training loop vs the textbook DataLoader loop (and skorch,
through tests/benchmarks/suite.py).

Same MLP (64-128-64-10) on `digits`, same initialization, Adam, same epochs; each epoch
ends with a validation pass in both loops, as the engine's does. Prints the median epoch
time (the first epoch, which pays one-off warm-up, is dropped) and the ratio.

    python tests/benchmarks/bench_epoch.py [--epochs 12] [--batch-sizes 16 64 256]

Not a unit test: figures depend on the machine and go in the README by hand.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.data import load_data
from engine.latency import machine
from engine.models import build_model
from engine.recipe import Recipe
from engine.runner import resolve
from engine.train import train


def recipe_for(batch: int, epochs: int) -> Recipe:
    return resolve({"data": {"source": "builtin:digits"},
                             "model": {"source": "builtin:mlp", "hidden": [128, 64]},
                             "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": batch,
                                       "epochs": epochs, "early_stopping": None}})


def engine_epochs(recipe: Recipe, device: torch.device) -> tuple[list[float], float]:
    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, data.n_classes, seed=0).to(device)
    result = train(model, data, recipe.train, device=device, seed=0)
    stamps = [0.0, *result.history["time_s"]]
    return [b - a for a, b in itertools.pairwise(stamps)], result.history["val_accuracy"][-1]


def textbook_epochs(recipe: Recipe, device: torch.device) -> tuple[list[float], float]:
    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, data.n_classes, seed=0).to(device)
    loader = DataLoader(TensorDataset(torch.tensor(data.X_train), torch.tensor(data.y_train)),
                        batch_size=recipe.train.batch_size, shuffle=True)
    X_val = torch.tensor(data.X_val).to(device)
    y_val = torch.tensor(data.y_val).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.train.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    times, acc = [], 0.0
    for _ in range(recipe.train.epochs):
        start = time.perf_counter()
        model.train()
        total = 0.0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        model.eval()
        with torch.no_grad():
            out = model(X_val)
            acc = float((out.argmax(1) == y_val).float().mean())
            loss_fn(out, y_val).item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, acc


def skorch_epochs(recipe: Recipe, device: torch.device) -> tuple[list[float], float]:
    """skorch's NeuralNetClassifier on the same MLP, initialization, data and batch size:
    train_split=None (no internal validation split), default callbacks, verbose=0; the
    epoch times are its own history's `dur`."""
    from skorch import NeuralNetClassifier

    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, data.n_classes, seed=0)
    torch.manual_seed(0)
    net = NeuralNetClassifier(model, criterion=torch.nn.CrossEntropyLoss,
                              optimizer=torch.optim.Adam, lr=recipe.train.lr,
                              max_epochs=recipe.train.epochs,
                              batch_size=int(recipe.train.batch_size), train_split=None,
                              iterator_train__shuffle=True, device=str(device), verbose=0)
    net.fit(data.X_train, data.y_train)
    acc = float((net.predict(data.X_val) == data.y_val).mean())
    return [float(d) for d in net.history[:, "dur"]], acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    info = machine()
    print(f"machine: {info['processor']}, {info['platform']}, torch {info['torch']}, "
          f"{info['threads']} threads, device {device}" + (f" ({info['gpu']})"
                                                          if "gpu" in info else ""))
    print(f"digits MLP 64-128-64-10, Adam, {args.epochs} epochs, median epoch time "
          f"(first epoch dropped)\n")
    print(f"{'batch':>6} {'engine ms':>10} {'textbook ms':>12} {'ratio':>7} "
          f"{'engine acc':>11} {'textbook acc':>13}")
    for batch in args.batch_sizes:
        recipe = recipe_for(batch, args.epochs)
        ours, our_acc = engine_epochs(recipe, device)
        theirs, their_acc = textbook_epochs(recipe, device)
        a, b = statistics.median(ours[1:]) * 1e3, statistics.median(theirs[1:]) * 1e3
        print(f"{batch:>6} {a:>10.1f} {b:>12.1f} {b / a:>6.2f}x {our_acc:>11.3f} "
              f"{their_acc:>13.3f}")


if __name__ == "__main__":
    main()
