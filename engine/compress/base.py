"""What every compression technique shares: the registry, its context and its result.

A technique is `fn(model, step, ctx) -> StepResult`: `model` is the chain's current model
(never mutated: every technique copies first), `step` the recipe step with its settings
resolved from the registry, `ctx` what the technique may need (data on the device, the
training settings for fine-tuning, the seed, progress).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.functional import cross_entropy, kl_div, log_softmax, mse_loss

from engine.data import DataBundle
from engine.errors import UserError
from engine.metrics import evaluate
from engine.models import set_training
from engine.recipe import AugmentConfig, ModelConfig, Recipe, TrainConfig
from engine.registry import Registry
from engine.train import train

COMPRESSORS = Registry("compression", "compression technique",
                       "Compression techniques; a recipe's compress list chains them.")


@dataclass
class StepResult:
    """What one step yields: a runnable model and what the runner cannot see by itself."""

    model: nn.Module | None  # the compressed PyTorch model (None for ONNX Runtime variants)
    runtime: str = "torch"  # "torch", or "onnxruntime" when the variant only runs there
    onnx_bytes: bytes | None = None  # the shipped .onnx file of an onnxruntime variant
    metrics: dict[str, Any] = field(default_factory=dict)  # figures the runner cannot measure
    #   itself (an onnxruntime variant's test accuracy, loss and latency)
    history: dict[str, list[float]] | None = None  # fine-tuning history, if it fine-tuned
    notes: list[str] = field(default_factory=list)  # plain sentences shown with the variant
    huffman: bool = False  # the shipped file may Huffman-code this variant's weights
    reference_onnx: bytes | None = None  # an onnxruntime variant's float32 .onnx, which the
    #   runner times beside it (the reference of its "vs ONNX Runtime fp32" ratio)
    source: nn.Module | None = None  # the PyTorch model an onnxruntime variant was made
    #   from: its weights, non-zeros and FLOPs are that model's (run_chain sets it)


def hinton_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, y: torch.Tensor, *,
                task: str, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y); for
    regression alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, y)."""
    if task == "classification":
        T = temperature
        soft = kl_div(log_softmax(student_out / T, 1), log_softmax(teacher_out / T, 1),
                        reduction="batchmean", log_target=True) * T * T
        hard = cross_entropy(student_out, y)
    else:
        soft = mse_loss(student_out.reshape(teacher_out.shape), teacher_out)
        hard = mse_loss(student_out.reshape(y.shape), y)
    return alpha * soft + (1 - alpha) * hard


@dataclass
class CompressContext:
    """Everything a technique may use besides the model."""

    tensors: dict[str, torch.Tensor]  # X_train, y_train, X_val, y_val, X_test, y_test
    task: str  # "classification" or "regression"
    input_shape: tuple[int, ...]
    n_out: int
    train_cfg: TrainConfig  # the run's: optimizer, lr, batch size
    model_cfg: ModelConfig  # the run's (a student at a width multiplier)
    data: DataBundle  # for is_image, class names, the fine-tuning rows
    device: torch.device
    seed: int
    on_progress: Callable[[dict[str, Any]], None] = lambda event: None
    baseline_model: nn.Module | None = None  # the trained model, the latency reference
    export_onnx: bool = False  # export every variant for deployment (recipe export.onnx)
    augment: AugmentConfig | None = None  # the recipe's data.augment: fine-tuning uses it too
    reference_outputs: torch.Tensor | None = None  # the baseline's test outputs (fidelity)

    @classmethod
    def of_run(cls, recipe: Recipe, data: DataBundle, tensors: dict[str, torch.Tensor],
               device: torch.device, emit: Callable[[dict[str, Any]], None]
               ) -> CompressContext:
        """The context of a run of `recipe` on `data` (its tensors on `device`)."""
        return cls(tensors=tensors, task=data.task, input_shape=data.input_shape,
                   n_out=data.n_outputs, train_cfg=recipe.train, model_cfg=recipe.model,
                   data=data, device=device, seed=recipe.seed, on_progress=emit,
                   augment=recipe.data.augment)

    def finetune(self, model: nn.Module, epochs: int, *, variant: str,
                 lr: float | None = None,
                 after_step: Callable[[nn.Module], None] | None = None,
                 loss_fn: Callable[..., torch.Tensor] | None = None,
                 fresh: bool = False) -> dict[str, list[float]]:
        """Train `model` in place for `epochs` with the run's optimizer (no early stopping,
        constant rate unless given); `after_step(model)` runs after every optimizer step
        (re-applying a pruning mask, say); `loss_fn(out, xb, yb)` replaces the task loss
        (distillation: `out` is the model's output on the batch `xb`). A model being
        recovered keeps its BatchNorm statistics (small, narrow fine-tuning batches
        overwrote a pretrained CNN's: 5-bit sharing of EfficientNet-Lite0 fell to 0.15
        agreement); a `fresh` one (a distillation student) learns its own. Image batches
        are augmented as the recipe's `data.augment` says, as in training (label-free, the
        original is asked about the same augmented batch, so more crops cost nothing).
        Returns the history. Zero epochs return an empty history."""
        if epochs <= 0:
            return {}
        if loss_fn is None and self.data.labels == "teacher" and self.baseline_model is not None:
            loss_fn = self._from_original()  # no labels: recover by matching the original
        cfg = dataclasses.replace(self.train_cfg, epochs=epochs, early_stopping=None,
                                  schedule=None, lr=lr or self.train_cfg.lr, freeze=())
        result = train(model, self.data, cfg, device=self.device, seed=self.seed,
                       augment_cfg=self.augment, tensors=self.tensors,
                       after_step=after_step, loss_override=loss_fn,
                       frozen_norms=not fresh,
                       on_progress=lambda e: self.on_progress({**e, "variant": variant}))
        return result.history

    def _from_original(self) -> Callable[..., torch.Tensor]:
        """Label-free fine-tuning's loss: the original model's full output distribution
        (KL at T=1 for a classifier, MSE otherwise), not only its top-1 labels."""
        teacher = self.baseline_model
        set_training(teacher, False)

        def loss_fn(out: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_out = teacher(xb).float()
            return hinton_loss(out, t_out, yb, task=self.task, temperature=1.0, alpha=1.0)
        return loss_fn

    def evaluate(self, model: nn.Module, part: str = "test") -> dict[str, float]:
        return evaluate(model, self.tensors[f"X_{part}"], self.tensors[f"y_{part}"], self.task)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy: techniques never mutate the model they are given."""
    return copy.deepcopy(model)


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every Linear and Conv layer: the layers compression acts on."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def layer_widths(model: nn.Module, step: dict, *, low: int, high: int = 8) -> dict[str, int]:
    """Each prunable layer's bit width: `step["layer_bits"]` where it names the layer, else
    `step["bits"]` (mixed precision); a name that is not a layer, or a width out of range,
    is refused in one sentence."""
    names = [name for name, _ in prunable(model)]
    given = step.get("layer_bits") or {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UserError(f"layer_bits names {', '.join(unknown[:3])}, which "
                        f"{'is not a layer' if len(unknown) == 1 else 'are not layers'} of "
                        f"this model; its layers are {', '.join(names[:8])}"
                        f"{', ...' if len(names) > 8 else ''}.")
    for name, bits in given.items():
        if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
            raise UserError(f"layer_bits gives {name} {bits!r} bits; use a whole number "
                            f"from {low} to {high}.")
    return {name: given.get(name, step["bits"]) for name in names}


def widths_text(widths: dict[str, int]) -> str:
    """`5 bits`, or for mixed precision `2-6 bits (net.0: 3, net.2: 2, ...)`."""
    values = sorted(set(widths.values()))
    if len(values) <= 1:
        return f"{values[0] if values else 0} bits"
    each = ", ".join(f"{name}: {bits}" for name, bits in list(widths.items())[:6])
    return (f"{values[0]}-{values[-1]} bits ({each}{', ...' if len(widths) > 6 else ''})")
