"""Knowledge distillation: train a smaller student on the teacher's softened outputs.

Response distillation is Hinton, Vinyals & Dean (2015): the student matches the teacher's
class probabilities at temperature T, scaled by T² so that the soft term's gradients keep
their size as T changes, plus the usual loss on the true labels. Feature distillation adds
Romero et al.'s (FitNets, 2015) hint loss: the student's last hidden representation (the
input of its output layer), passed through a learned linear projection, matches the
teacher's. The teacher is the model the step is given; it is copied, never changed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.functional import mse_loss

from engine.compress.base import COMPRESSORS, CompressContext, StepResult, clone, hinton_loss
from engine.compress.capabilities import NO_STUDENT
from engine.errors import UserError
from engine.hf import build_hf, scaled_builder
from engine.hf_text import build_hf_text, layer_list
from engine.models import build_model, set_training
from engine.recipe import ModelConfig, Recipe
from engine.registry import Param
from engine.sections import resolve_model


def student_config(student: dict, width_multiplier: float, teacher: ModelConfig) -> ModelConfig:
    """The student's model section: the one given, or the teacher's built-in architecture
    with every hidden width and channel count scaled by `width_multiplier` (at least 1)."""
    if student:
        try:
            return resolve_model(Recipe.from_dict({"model": student}).model)
        except UserError as exc:
            raise UserError(f"the distillation student is not a valid model section: {exc}") \
                from None
    source = teacher.source
    if not source.startswith("builtin:"):
        if teacher.architecture is None:  # an uploaded graph: its widths are unknown
            raise UserError(NO_STUDENT)
        source = f"builtin:{teacher.architecture}"  # a state_dict of a known architecture

    def scale(widths: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, round(w * width_multiplier)) for w in widths)

    return dataclasses.replace(teacher, source=source, architecture=None,
                               hidden=scale(teacher.hidden), channels=scale(teacher.channels))


def shallow_student(teacher: nn.Module, depth: float, width: float) -> tuple[nn.Module, str]:
    """A transformer student with `depth` of the teacher's layers (evenly spaced) at `width`
    of its width: at full width it starts from the teacher's embeddings, the kept layers
    and the head (Sanh et al., DistilBERT, 2019), else from random weights."""
    builder = teacher.workbench_builder
    config = dict(builder["config"])
    key = next((k for k in ("num_hidden_layers", "n_layers", "num_layers") if k in config), None)
    path, layers = layer_list(teacher)
    if key is None or layers is None:
        raise UserError(f"distill cannot find the layers of this {config.get('model_type')} "
                        f"model to keep a share of; set depth_fraction to 1.")
    count = len(layers)
    keep = max(1, round(count * depth))
    chosen = [round(i * count / keep) for i in range(keep)]
    config[key] = keep
    student_builder = {**builder, "config": config}
    if width < 1.0:
        student_builder = scaled_builder(student_builder, width)
    student = build_hf_text(student_builder)
    if width >= 1.0:
        source = teacher.state_dict()
        state = {}
        for name in student.state_dict():
            origin = name
            if name.startswith(f"{path}."):
                index, _, rest = name.removeprefix(f"{path}.").partition(".")
                origin = f"{path}.{chosen[int(index)]}.{rest}"
            state[name] = source[origin]
        student.load_state_dict(state)
    start = "the teacher's layers " + ", ".join(str(i) for i in chosen) if width >= 1.0 \
        else "random weights"
    return student, (f"{config.get('model_type')} with {keep} of {count} layers at width "
                     f"{width:g}, from {start}")


def output_layer(model: nn.Module) -> nn.Module:
    """The last Linear or Conv layer in module order: the output layer of a built-in."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if not layers:
        raise UserError("feature distillation needs a model whose output layer is a Linear "
                        "or Conv layer; use mode 'response'.")
    return layers[-1]


class _Features:
    """Records the input of a model's output layer on every forward pass, until removed."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._hook = output_layer(model).register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0].flatten(1).float()  # float: autocast may hand over bf16

    def remove(self) -> None:
        self._hook.remove()


class _HintStudent(nn.Module):
    """The student plus its hint projection, so the trainer's optimizer updates both."""

    def __init__(self, student: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _probe(model: nn.Module, feats: _Features, ctx: CompressContext, who: str) -> int:
    """The width of the recorded features, checking that the hook sees the output layer."""
    with torch.no_grad():
        model(ctx.tensors["X_train"][:2])
    if feats.value is None:
        raise UserError(f"the {who}'s output layer is not called as a module (an exported "
                        f"graph), so its features cannot be read; use mode 'response'.")
    return feats.value.shape[1]


def _describe(cfg: ModelConfig) -> str:
    if not cfg.source.startswith("builtin:"):
        return cfg.source
    name = cfg.source.removeprefix("builtin:")
    if name == "logreg":
        return name
    channels = f", channels {list(cfg.channels)}" if name == "cnn" else ""
    return f"{name} (hidden {list(cfg.hidden)}{channels})"


@COMPRESSORS.register(
    "distill", "Knowledge distillation: train a smaller student model to reproduce this "
    "model's softened predictions (and, in feature mode, its last hidden layer).", params=(
        Param("student", "dict", {}, "the student's model section; empty: the teacher's "
              "architecture at width_multiplier"),
        Param("width_multiplier", "float", 0.5, "scales the teacher's hidden widths and "
              "channels when no student is given (rounded, at least 1)", low=0.01, high=1.0),
        Param("depth_fraction", "float", 1.0, "transformer text models: the share of the "
              "teacher's layers the student keeps, evenly spaced (0.5: every other layer, "
              "as DistilBERT), initialized from the teacher's at full width", low=0.05,
              high=1.0),
        Param("temperature", "float", 4.0, "softmax temperature T of the soft targets",
              low=1.0, high=20.0),
        Param("alpha", "float", 0.9, "weight of the soft-target term; 1 - alpha goes to "
              "the true labels", low=0.0, high=1.0),
        Param("epochs", "int", 30, "training epochs of the student", low=1, high=1000),
        Param("mode", "str", "response", "response: outputs only; feature: also the last "
              "hidden layer (FitNets hint)", choices=("response", "feature")),
        Param("beta", "float", 1.0, "weight of the feature hint loss", low=0.0,
              when=("mode", ("feature",))),
    ))
def distill(model: nn.Module, step: dict, ctx: CompressContext) -> StepResult:
    """Train a new student on `model`'s outputs; `model` is left as it is."""
    teacher = clone(model)
    set_training(teacher, False)
    builder = getattr(model, "workbench_builder", None) or {}
    if step["depth_fraction"] < 1.0 and (step["student"] or builder.get("kind") != "hf_text"):
        raise UserError("distill's depth_fraction keeps a share of a transformer text "
                        "model's layers, and this step's student is not one; set it to 1 and "
                        "use width_multiplier or a student section.")
    if not step["student"] and builder.get("kind") == "hf_text":  # fewer layers, thinner
        torch.manual_seed(ctx.seed)
        student, described = shallow_student(model, step["depth_fraction"],
                                             step["width_multiplier"])
        student = student.to(ctx.device)
    elif not step["student"] and builder.get("kind") == "hf":  # the teacher's family, thinner
        torch.manual_seed(ctx.seed)
        student = build_hf(scaled_builder(builder, step["width_multiplier"])).to(ctx.device)
        described = (f"{builder['config'].get('model_type')} at width "
                     f"{step['width_multiplier']:g}")
    else:
        teacher_cfg = ctx.model_cfg
        if not step["student"] and builder.get("kind") == "builtin":  # a reloaded bundle
            teacher_cfg = ModelConfig(source=f"builtin:{builder['name']}", **{
                k: tuple(v) if isinstance(v, list) else v for k, v in builder["model"].items()})
        cfg = student_config(step["student"], step["width_multiplier"], teacher_cfg)
        student = build_model(cfg, ctx.input_shape, ctx.n_out, seed=ctx.seed).to(ctx.device)
        described = _describe(cfg)
    soft = dict(task=ctx.task, temperature=step["temperature"], alpha=step["alpha"])
    hooks: list[_Features] = []
    trained: nn.Module = student

    if step["mode"] == "response":
        def loss_fn(out: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_out = teacher(xb).float()
            return hinton_loss(out, t_out, yb, **soft)
    else:
        set_training(student, False)  # the probe below should not touch batch statistics
        hooks = [_Features(student), _Features(teacher)]
        s_feats, t_feats = hooks
        width_s = _probe(student, s_feats, ctx, "student")
        width_t = _probe(teacher, t_feats, ctx, "teacher")
        torch.manual_seed(ctx.seed)
        projection = nn.Linear(width_s, width_t).to(ctx.device)
        trained = _HintStudent(student, projection)

        def loss_fn(out: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            hint_s = s_feats.value  # recorded by the forward pass that produced `out`
            with torch.no_grad():
                t_out = teacher(xb).float()
            hint = mse_loss(projection(hint_s), t_feats.value)
            return hinton_loss(out, t_out, yb, **soft) + step["beta"] * hint

    try:
        history = ctx.finetune(trained, step["epochs"], variant="distill", loss_fn=loss_fn,
                               fresh=True)
    finally:
        for h in hooks:
            h.remove()
    set_training(student, False)
    n_teacher = sum(p.numel() for p in model.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    notes = [f"Student {described}: {n_student:,} parameters vs the teacher's "
             f"{n_teacher:,} ({n_student / n_teacher:.0%}).",
             f"Trained {step['epochs']} epochs at T={step['temperature']:g}, "
             f"alpha={step['alpha']:g}" + (f", hint weight beta={step['beta']:g}."
                                           if step["mode"] == "feature" else ".")]
    if n_student >= n_teacher:
        notes.append("The student is not smaller than the teacher; lower width_multiplier "
                     "or give a smaller student.")
    return StepResult(model=student, history=history, notes=notes)
