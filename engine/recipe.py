"""The recipe: the public contract of a run, as frozen dataclasses.

A recipe is JSON (or YAML). `load_recipe` reads a file, `Recipe.from_dict` checks a dict:
unknown keys and bad values are refused with one sentence naming the key and the fix, and
every default is filled in so that `to_dict()` is the complete, replayable recipe.
This module is the schema alone: it knows no registry. Technique-specific settings (a
schedule's `gamma`, a dataset's `noise`, an optimizer's default learning rate) and the names
of techniques are checked, and their defaults filled, by `engine.runner.resolve`, from the
registries that hold them; nothing here repeats them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from engine.errors import UserError
from engine.schema import at_least as _at_least
from engine.schema import build, dump
from engine.schema import choice as _choice

# the allowed values of the recipe's enumerated settings, for validation and for the app
TASKS = ("auto", "classification", "regression")
SCALINGS = ("standard", "minmax", False)  # `standardize: true` means "standard"
# where the labels come from (data.labels) and what an integer label means
# (data.label_space), each choice as the page names it
LABELS = {"data": "from the data",
          "teacher": "the model's own predictions (label-free: agreement)"}
LABEL_SPACES = {"data": "renumbered over the classes present",
                "model": "indices into the model's outputs"}
MISSING = ("refuse", "drop", "mean", "median")
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "leaky_relu")
VALIDATION_PARAMS = ("model.hidden", "model.dropout", "train.l2", "train.weight_decay",
                     "train.epochs")
SELECTIONS = ("variance", "kbest")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class FeatureSelectionConfig:
    method: str = "variance"  # "variance": drop features whose training variance <= threshold;
    #                            "kbest": keep the k with the highest mutual information
    threshold: float = 0.0  # for "variance": in the raw feature's units squared (selection
    #                          runs before scaling)
    k: int = 10  # for "kbest"

    def validate(self) -> None:
        _choice("data.feature_selection.method", self.method, SELECTIONS)
        _at_least("data.feature_selection.threshold", self.threshold, 0.0)
        _at_least("data.feature_selection.k", self.k, 1)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # random horizontal flips, half of each batch on average
    shift: int = 1  # random translation of up to this many pixels in each direction

    def validate(self) -> None:
        _at_least("data.augment.shift", self.shift, 0)


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin:digits"  # "builtin:NAME" or a path: .csv, .parquet, .npz, .zip
    target: str | None = None  # label column of a table; None: the first named like a label
    #                            (target, label, class, species, y, ...), else the last
    task: str = "auto"  # "classification", "regression" or "auto" (from the labels)
    val_fraction: float = 0.2  # of all rows, for early stopping and model selection
    test_fraction: float = 0.2  # of all rows, touched only for the final figures
    standardize: bool | str = True  # True or "standard": zero mean, unit variance;
    #                                  "minmax": scaled to [0, 1]; False: raw values.
    #                                  Always fitted on the training part only.
    missing: str = "refuse"  # missing table values: "refuse", "drop" rows, "mean", "median"
    feature_selection: FeatureSelectionConfig | None = None
    augment: AugmentConfig | None = None  # images only; applied per batch on the device
    image_size: tuple[int, int] = (28, 28)  # every image of a ZIP is resized to (H, W)
    params: dict[str, Any] = field(default_factory=dict)  # the dataset's own settings
    labels: str = "data"  # "data": the file's labels; "teacher": none needed, the original
    #                       model's own predictions are the labels, and every variant is
    #                       scored by its agreement with them (test_agreement)
    label_space: str = "data"  # "data": labels renumbered 0..K-1 over the classes present;
    #                            "model": integer labels are indices into the model's own
    #                            outputs (ImageNet ids for a 1000-class head), kept as they are
    text: str | None = None  # a table's text column: each row is tokenized by the
    #                          tokenizer below, and the model takes its token ids
    max_length: int = 128  # tokens per text at most (longer texts are truncated, and said);
    #                        also capped by the model's position table
    tokenizer: str | None = None  # "hf:PATH" whose tokenizer encodes text; None: the model's

    def validate(self) -> None:
        _choice("data.task", self.task, TASKS)
        _at_least("data.max_length", self.max_length, 2)
        if self.text is not None and self.feature_selection is not None:
            raise UserError("data.feature_selection applies to numeric tables, not to text; "
                            "set it to null for data.text.")
        if self.tokenizer is not None and not self.tokenizer.startswith("hf:"):
            raise UserError(f"data.tokenizer takes a Hugging Face folder as \"hf:PATH\", got "
                            f"{self.tokenizer!r}.")
        _choice("data.standardize", self.standardize, (True, *SCALINGS))
        _choice("data.missing", self.missing, MISSING)
        _choice("data.labels", self.labels, tuple(LABELS))
        _choice("data.label_space", self.label_space, tuple(LABEL_SPACES))
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"data.{name} must be in [0, 1), got {value!r}.")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise UserError("data.val_fraction + data.test_fraction must leave at least 10% "
                            "of the rows for training; lower one of them.")
        if len(self.image_size) != 2 or min(self.image_size) < 4:
            raise UserError(f"data.image_size must be two sizes of at least 4 pixels, "
                            f"got {list(self.image_size)!r}.")
        if self.params and not self.source.startswith("builtin:"):
            raise UserError("data.params applies to built-in datasets only; remove it "
                            "for a file source.")


@dataclass(frozen=True)
class ModelConfig:
    source: str = "builtin:mlp"  # "builtin:NAME" or a path: .pt2, .pt (state_dict or
    #                               TorchScript), .onnx
    architecture: str | None = None  # built-in architecture a state_dict upload belongs to
    hidden: tuple[int, ...] = (128, 64)  # widths of the hidden layers (mlp; cnn's head)
    activation: str = "relu"  # relu, tanh, gelu, sigmoid, leaky_relu
    dropout: float = 0.0  # drop probability before each hidden linear layer's output
    channels: tuple[int, ...] = (16, 32)  # cnn: filters per convolution block
    kernel_size: int = 3  # cnn: convolution window, in pixels or samples

    def validate(self) -> None:
        _choice("model.activation", self.activation, ACTIVATIONS)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout!r}.")
        for name in ("hidden", "channels"):
            if any(not isinstance(w, int) or w < 1 for w in getattr(self, name)):
                raise UserError(f"model.{name} must be a list of positive integers, "
                                f"got {list(getattr(self, name))!r}.")
        _at_least("model.kernel_size", self.kernel_size, 1)


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"  # a registered schedule: constant, step, cosine, ...
    warmup_epochs: int = 0  # linear warm-up over this many epochs before the schedule
    warmup_start: float = 0.1  # warm-up starts at this fraction of the base learning rate
    options: dict[str, Any] = field(default_factory=dict)  # the schedule's own settings,
    #                                  written flat in JSON: {"name": "step", "gamma": 0.5}
    FLAT: ClassVar[str] = "options"

    def validate(self) -> None:
        _at_least("train.schedule.warmup_epochs", self.warmup_epochs, 0)
        if not 0.0 <= self.warmup_start <= 1.0:
            raise UserError(f"train.schedule.warmup_start must be in [0, 1], "
                            f"got {self.warmup_start!r}.")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = 10  # epochs without a validation-loss improvement before stopping
    min_delta: float = 0.0  # an improvement must lower the validation loss by more than this
    restore_best: bool = True  # end with the weights of the best validation epoch

    def validate(self) -> None:
        _at_least("train.early_stopping.patience", self.patience, 1)
        _at_least("train.early_stopping.min_delta", self.min_delta, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # a registered optimizer: sgd, momentum, adam, lbfgs, newton, ...
    lr: float | None = None  # base learning rate; None takes the optimizer's own default
    #                          (sgd 0.01, adam 0.001, lbfgs/newton/bfgs 1.0: a step multiplier)
    momentum: float | None = None  # the older spelling of optimizer_options.momentum for
    #                                the momentum and nesterov optimizers; null: their default
    weight_decay: float = 0.0  # decoupled decay: w <- w - lr * weight_decay * w after a step
    l2: float = 0.0  # coupled L2 penalty: adds l2/2 * sum(w^2) to the loss (weights only)
    l1: float = 0.0  # L1 penalty: adds l1 * sum(|w|) to the loss (weights only)
    batch_size: int | str = 64  # examples per step; 1 is stochastic GD, "full" is batch GD
    epochs: int = 30  # passes over the training part (iterations for full-batch methods);
    #                   0 evaluates (and compresses) an uploaded or earlier model as it is
    schedule: ScheduleConfig | None = field(default_factory=ScheduleConfig)  # None: constant
    early_stopping: EarlyStoppingConfig | None = field(default_factory=EarlyStoppingConfig)
    grad_clip: float | None = None  # clip the gradient's global L2 norm to this value
    freeze: tuple[str, ...] = ()  # layer names (prefixes) kept fixed while the rest trains
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # eps, betas, history_size
    amp: bool = True  # with precision "auto": bf16 autocast on CUDA; ignored on the CPU
    precision: str = "auto"  # "auto": bf16 autocast on CUDA when amp, float32 on the CPU;
    #                          "fp32": float32 everywhere; "bf16": bf16 autocast on CUDA and
    #                          on the CPU too (slower there on CPUs without bf16 units)
    compile: bool = False  # torch.compile the model for training (the first epoch pays
    #                        for compiling; falls back to eager if compiling fails)

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"train.lr must be positive, got {self.lr!r}.")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise UserError(f"train.momentum must be in [0, 1), got {self.momentum!r}.")
        for name in ("weight_decay", "l2", "l1"):
            _at_least(f"train.{name}", getattr(self, name), 0.0)
        if isinstance(self.batch_size, str):
            _choice("train.batch_size", self.batch_size, ("full",))
        else:
            _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.epochs", self.epochs, 0)  # 0: evaluate a loaded model as it is
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"train.grad_clip must be positive or null, got {self.grad_clip!r}.")
        _choice("train.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class SensitivityConfig:
    amounts: tuple[float, ...] = (0.5, 0.75, 0.9)  # magnitude pruning of one layer at a time
    bits: tuple[int, ...] = (2, 4, 8)  # uniform per-channel quantization of one layer
    ranks: tuple[float, ...] = (0.1, 0.25, 0.5)  # SVD rank fractions of one layer
    part: str = "val"  # scored on the validation part, so the test part stays untouched

    def validate(self) -> None:
        _choice("sensitivity.part", self.part, ("val", "test"))
        if any(not 0 < a < 1 for a in self.amounts):
            raise UserError("sensitivity.amounts must lie strictly between 0 and 1.")
        if any(not 1 <= b <= 16 for b in self.bits):
            raise UserError("sensitivity.bits must be whole numbers from 1 to 16.")
        if any(not 0 < r <= 1 for r in self.ranks):
            raise UserError("sensitivity.ranks must be fractions in (0, 1].")


@dataclass(frozen=True)
class LearningCurveConfig:
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # of the training part
    repeats: int = 3  # fresh models per fraction, on different subsets: the bands

    def validate(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise UserError("diagnose.learning_curve.fractions must be fractions in (0, 1].")
        _at_least("diagnose.learning_curve.repeats", self.repeats, 1)


@dataclass(frozen=True)
class ValidationCurveConfig:
    param: str = "model.hidden"  # the complexity knob: model.hidden, model.dropout,
    #                              train.l2, train.weight_decay or train.epochs
    values: tuple[Any, ...] = ([8], [32], [128], [512])
    repeats: int = 2

    def validate(self) -> None:
        _choice("diagnose.validation_curve.param", self.param, VALIDATION_PARAMS)
        if not self.values:
            raise UserError("diagnose.validation_curve.values needs at least one value.")
        _at_least("diagnose.validation_curve.repeats", self.repeats, 1)


@dataclass(frozen=True)
class BiasVarianceConfig:
    rounds: int = 20  # bootstrap rounds, each a freshly initialized model

    def validate(self) -> None:
        _at_least("diagnose.bias_variance.rounds", self.rounds, 2)


@dataclass(frozen=True)
class LandscapeConfig:
    points: int = 21  # evaluations along each direction
    span: float = 1.0  # how far along the filter-normalized directions, each way
    two_d: bool = False  # a 2-D grid of points x points instead of a 1-D slice

    def validate(self) -> None:
        _at_least("diagnose.landscape.points", self.points, 3)
        if not self.span > 0:
            raise UserError("diagnose.landscape.span must be positive.")


@dataclass(frozen=True)
class DiagnoseConfig:
    learning_curve: LearningCurveConfig | None = field(default_factory=LearningCurveConfig)
    validation_curve: ValidationCurveConfig | None = None
    bias_variance: BiasVarianceConfig | None = field(default_factory=BiasVarianceConfig)
    complexity: bool = True  # parameters, FLOPs and a Rademacher estimate (random labels)
    landscape: LandscapeConfig | None = None

    def validate(self) -> None:
        """Each part validates itself."""


@dataclass(frozen=True)
class ExportConfig:
    onnx: bool = False  # also write DIR/<variant>.deploy.onnx for every variant: raw inputs
    #                     in (preprocessing inside), checked against PyTorch, timed

    def validate(self) -> None:
        """Checked by Recipe.validate, which knows what this engine version can export."""


@dataclass(frozen=True)
class Recipe:
    seed: int = 0  # seeds the split, the initialization, the batch order and dropout
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"
    name: str | None = None  # a label for the run, shown in the app and the store
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: tuple[dict[str, Any], ...] = ()  # an ordered chain of compression steps
    sensitivity: SensitivityConfig | None = None  # per-layer sensitivity to compression
    tune: dict[str, Any] | None = None  # hyperparameter search (engine/tune.py: sampler,
    #                                     space, validation, objectives); the run then trains
    #                                     the winner as its baseline
    diagnose: DiagnoseConfig | None = None  # learning curves, bias-variance, complexity
    autocompress: dict[str, Any] | None = None  # search for the smallest or fastest chain
    #                                             within a budget (engine/autocompress)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                            f"got {self.device!r}.")
        for i, step in enumerate(self.compress):
            if not isinstance(step, dict) or "technique" not in step:
                raise UserError(f"compress[{i}] must be an object with a 'technique' key, "
                                f'such as {{"technique": "prune", "amount": 0.8}}.')
        if self.autocompress is not None and not isinstance(self.autocompress, dict):
            raise UserError(f'autocompress must be an object such as {{"budget": {{"max_drop":'
                            f' 0.01}}, "objective": "size"}}, got {self.autocompress!r}.')
        if self.tune is not None and not isinstance(self.tune, dict):
            raise UserError(f"tune must be an object with keys such as sampler, n_trials and "
                            f"space, got {self.tune!r}.")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        """Check `raw` and return the recipe with every default filled in."""
        return build(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        """The complete recipe as plain JSON data (lists, not tuples; flat schedule)."""
        return dump(self)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def title(self) -> str:
        """What a run of this recipe trains on what, for its name: `mlp on digits`."""
        return f"{short_source(self.model.source)} on {short_source(self.data.source)}"


# an upload is stored as HASH_NAME (its content's SHA-256, 12 hex digits, then its name)
STORED = re.compile(r"^[0-9a-f]{12}_")


def short_source(source: str) -> str:
    """A source as a person names it: the built-in's or architecture's name, or the
    file's or folder's."""
    for prefix in ("builtin:", "hfarch:"):
        if source.startswith(prefix):
            return source.removeprefix(prefix)
    path = Path(source.removeprefix("hf:"))
    if re.fullmatch(r"[0-9a-f]{32}", path.parent.name):  # a variant's bundle in a run folder
        return f"{path.name} of run {path.parent.name[:6]}"
    if path.name == "model.onnx" and STORED.match(path.parent.name):  # an unpacked folder's
        path = path.parent
    return STORED.sub("", path.name)  # an upload by the name it was uploaded under


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (.json, .yaml or .yml) and check it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist; check the path.")
    text = path.read_text(encoding="utf-8")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # json's ValueError or yaml's YAMLError
        raise UserError(f"recipe file {str(path)!r} is not valid {'YAML' if is_yaml else 'JSON'}"
                        f" ({str(exc).splitlines()[0]}); fix the syntax.") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe file {str(path)!r} must hold one JSON object "
                        f"(keys seed, data, model, train, ...).")
    return Recipe.from_dict(raw)


def as_recipe(recipe: Recipe | dict[str, Any] | str | Path) -> Recipe:
    """Accept a Recipe, a dict or a path, as the public API does."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    return Recipe.from_dict(recipe)  # a dict, or a one-sentence refusal of anything else
