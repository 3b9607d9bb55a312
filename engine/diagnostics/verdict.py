"""The verdict: high bias, high variance or a good fit, with the evidence and what to try.

A pure function of numbers the other diagnostics already computed. The rules, in order:

1. high_variance: the training score exceeds the validation score by more than GAP_LIMIT
   (0.05 of accuracy or R², i.e. 5 points), or the bias-variance decomposition's variance
   exceeds its bias and is material (above MATERIAL of the loss scale: the error rate for
   0-1 loss, the test target's variance for squared loss). One exception: a large gap
   with a low training score (below) and a decomposition whose bias dominates is
   high_bias, as a linear model on a nonlinear target can show a gap of a few points
   from a small validation part while its test error is nearly all bias.
2. high_bias: the training score is low (accuracy below 0.90, R² below 0.70), or within
   NEAR_CHANCE of a chance-level `baseline_score` when one is given, with the gap within
   the limit; or the decomposition's bias dominates (above the variance and above the
   error a low training score allows: 0.10 of 0-1 loss, 0.30 of the target's variance).
3. good_fit otherwise.

Test labels count as the truth, so label noise reads as bias: on a noisy problem a
model at the noise floor is called high_bias. The reasons cite the numbers so a user
can judge that. The learning curve, when given, decides whether more data is suggested:
only if its validation score still rose by more than RISING over the last step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

GAP_LIMIT = 0.05  # train - val score above this: the model fits rows it cannot generalize to
LOW_TRAIN = {"classification": 0.90, "regression": 0.70}  # training accuracy / R² below this
NEAR_CHANCE = 0.10  # a training score this close to the chance-level baseline learned nothing
MATERIAL = 0.05  # variance below this fraction of the loss scale is not worth acting on
RISING = 0.01  # validation score gained over the learning curve's last step: more data helps

LABELS = {"classification": "accuracy", "regression": "R²"}


def diagnose(train_score: float, val_score: float, *, task: str,
             learning_curve: Mapping[str, Any] | None = None,
             bias_variance: Mapping[str, Any] | None = None,
             baseline_score: float | None = None) -> dict[str, Any]:
    """{"verdict": "high_bias" | "high_variance" | "good_fit", "reasons": [...],
    "suggestions": [...]} from the training and validation scores (accuracy or R²) and,
    when given, a learning curve, a bias-variance decomposition and a chance-level score."""
    if task not in LABELS:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")
    for name, value in (("train_score", train_score), ("val_score", val_score),
                        ("baseline_score", baseline_score)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}; the model "
                             f"probably diverged, so retrain it before diagnosing.")
    metric = LABELS[task]
    gap = train_score - val_score
    low = LOW_TRAIN[task]
    reasons = [_gap_sentence(task, train_score, val_score, gap)]

    low_train = train_score < low
    near_chance = baseline_score is not None and train_score - baseline_score < NEAR_CHANCE
    if low_train:
        reasons.append(f"Training {metric} {_num(train_score)} is below {_num(low)}: the "
                       f"model does not fit even the rows it learns from.")
    if near_chance:
        reasons.append(f"Training {metric} {_num(train_score)} is within "
                       f"{_gap(NEAR_CHANCE, task)} of the chance level "
                       f"{_num(baseline_score)}.")

    variance_dominates = bias_dominates = False
    if bias_variance is not None:
        bias, var = float(bias_variance["bias"]), float(bias_variance["variance"])
        scale = 1.0
        if bias_variance["loss"] == "squared" and bias_variance.get("target_variance"):
            scale = float(bias_variance["target_variance"])
        variance_dominates = var > bias and var / scale > MATERIAL
        bias_dominates = bias > var and bias / scale > 1 - low
        reasons.append(_decomposition_sentence(bias_variance, variance_dominates,
                                               bias_dominates))

    rising = _last_step(learning_curve)
    if rising is not None:
        reasons.append(_curve_sentence(metric, *rising))

    underfit = low_train or near_chance
    if gap > GAP_LIMIT and underfit and bias_dominates:
        verdict = "high_bias"  # a too-simple model: the gap is the smaller problem
        reasons.append(f"The gap of {_gap(gap, task)} is the smaller problem: the training "
                       f"{metric} is low and bias dominates the decomposition.")
    elif gap > GAP_LIMIT or variance_dominates:
        verdict = "high_variance"
        if underfit:
            reasons.append(f"The training {metric} is low as well, so once the gap closes "
                           f"the model may need more capacity too.")
        if bias_dominates:
            reasons.append("The decomposition's bias also counts label noise and test points "
                           "that no round gets right, so the train-validation gap decides.")
    elif underfit or bias_dominates:
        verdict = "high_bias"
    else:
        verdict = "good_fit"
    return {"verdict": verdict, "reasons": reasons,
            "suggestions": _suggestions(verdict, task, rising)}


def _num(x: float) -> str:
    return f"{x:.2f}"


def _gap(g: float, task: str) -> str:
    """A score difference as the user reads it: points of accuracy, plain R²."""
    if task == "classification":
        pts = f"{abs(100 * g):.3g}"
        return f"{pts} point" + ("" if pts == "1" else "s")
    return f"{abs(g):.2f}"


def _amount(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _gap_sentence(task: str, train: float, val: float, gap: float) -> str:
    metric = LABELS[task]
    limit = f"the allowance of {_gap(GAP_LIMIT, task)}"
    if gap > GAP_LIMIT:
        return (f"Training {metric} is {_num(train)} but validation {metric} {_num(val)}: "
                f"a gap of {_gap(gap, task)}, above {limit}.")
    if gap < 0:
        return (f"Validation {metric} {_num(val)} is {_gap(gap, task)} above training "
                f"{metric} {_num(train)}: the model is not memorizing its training rows.")
    return (f"Training {metric} is {_num(train)} and validation {metric} {_num(val)}: a gap "
            f"of {_gap(gap, task)}, within {limit}.")


def _decomposition_sentence(bv: Mapping[str, Any], variance_dominates: bool,
                            bias_dominates: bool) -> str:
    squared = bv["loss"] == "squared"
    loss = "squared error" if squared else "0-1 loss"
    bias_name = "bias²" if squared else "bias"
    text = (f"Over {bv['rounds']} bootstrap rounds the test {loss} of "
            f"{_amount(bv['expected_loss'])} has {bias_name} {_amount(bv['bias'])} and "
            f"variance {_amount(bv['variance'])}")
    if squared and bv.get("target_variance"):
        text += f" (the target's own variance is {_amount(bv['target_variance'])})"
    if variance_dominates:
        return text + ": variance dominates."
    if bias_dominates:
        return text + ": bias dominates."
    return text + ": neither is large."


def _last_step(lc: Mapping[str, Any] | None) -> tuple[float, float, Any, Any] | None:
    """(previous val score, last val score, previous size, last size) of a learning curve."""
    if not lc or len(lc.get("val_score") or ()) < 2:
        return None
    scores: Sequence[float] = lc["val_score"]
    sizes = lc.get("train_sizes") or lc.get("fractions") or list(range(1, len(scores) + 1))
    return float(scores[-2]), float(scores[-1]), sizes[-2], sizes[-1]


def _curve_sentence(metric: str, before: float, after: float, n_before: Any,
                    n_after: Any) -> str:
    where = f"{_num(before)} at {_rows(n_before)} to {_num(after)} at {_rows(n_after)}"
    if after - before > RISING:
        return (f"The learning curve's validation {metric} still rises at the largest size: "
                f"{where}.")
    return f"The learning curve's validation {metric} has levelled off: {where}."


def _rows(size: Any) -> str:
    if isinstance(size, float) and size <= 1:
        return f"{size:.0%} of the training rows"
    return f"{size} training rows"


def _suggestions(verdict: str, task: str, curve: tuple[float, float, Any, Any] | None
                 ) -> list[str]:
    more_data = curve is not None and curve[1] - curve[0] > RISING
    flat = curve is not None and not more_data
    out: list[str] = []
    if verdict == "high_variance":
        out += ["Add an L2 penalty (train.l2, e.g. 1e-3) or weight decay (train.weight_decay) "
                "to shrink the weights.",
                "Add dropout (model.dropout 0.2 to 0.5) between the hidden layers.",
                "Turn on early stopping (train.early_stopping with a patience of 5 to 10) so "
                "training ends when the validation loss turns up.",
                "Use fewer features (data.feature_selection, e.g. kbest) or a smaller model "
                "(fewer or narrower model.hidden layers)."]
        if more_data:
            out.append(f"Collect more training rows: the validation score was still rising "
                       f"by {_gap(curve[1] - curve[0], task)} at the largest size.")
        elif flat:
            out.append("More rows alone will help little, as the learning curve has levelled "
                       "off; regularize first.")
        else:
            out.append("Collect more training rows if you can; a learning curve shows "
                       "whether they still help.")
    elif verdict == "high_bias":
        out += ["Give the model more capacity: more or wider hidden layers (model.hidden), "
                "or an MLP instead of a linear model.",
                "Reduce regularization: lower train.l2, train.l1, train.weight_decay and "
                "model.dropout.",
                "Train longer: more train.epochs, a larger train.lr, or a longer "
                "early-stopping patience, until the training score stops rising."]
        if more_data:
            out.append(f"More training rows will help a little too: the validation score "
                       f"still rose by {_gap(curve[1] - curve[0], task)} at the largest size.")
        elif flat:
            out.append("More rows will not help: the validation score has levelled off, so "
                       "the model needs capacity, not data.")
    else:
        out.append("The fit is balanced: compress the model (prune, quantize) and check that "
                   "the test score holds.")
        if more_data:
            out.append(f"Collect more training rows: the validation score was still rising "
                       f"by {_gap(curve[1] - curve[0], task)} at the largest size.")
        out.append("For a higher score, add capacity step by step and keep the "
                   "train-validation gap under the allowance.")
    return out
