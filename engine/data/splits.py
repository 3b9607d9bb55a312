"""The task of a target, the holdout split and k-fold cuts: row indices, no data copied."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from engine.errors import UserError

MAX_CLASSES_AUTO = 50  # "auto" calls integer labels with at most this many values classes
MAX_CLASSES = 1000  # beyond this a "classification" target is surely a continuous value


def resolve_task(y: np.ndarray, requested: str, meta: dict[str, Any]
                 ) -> tuple[str, np.ndarray, list[str] | None]:
    """(task, labels, class_names): int64 labels 0..K-1 for classification, float32 otherwise."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(y == np.round(y)) and np.abs(y).max() < 2**31:
        y = y.astype(np.int64)  # 1.0/2.0 labels read from a CSV are integer classes
    task = requested if requested != "auto" else meta.get("task") or _guess_task(y)
    if task == "regression":
        if y.dtype.kind not in "iuf":
            raise UserError("data.task is regression but the target holds text labels; set "
                            "data.task to \"classification\" or pick a numeric target.")
        if np.ptp(y) == 0:
            raise UserError(f"the target is constant (all {len(y)} rows are {y[0]}); pick a "
                            f"target column that varies.")
        return task, y.astype(np.float32), None
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UserError(f"the target has a single class ({classes[0]} in all {len(y)} rows); a "
                        f"classifier needs at least 2 classes, pick another target column.")
    if len(classes) > MAX_CLASSES:
        raise UserError(f"the target has {len(classes)} distinct values, too many classes; set "
                        f"data.task to \"regression\".")
    names = meta.get("class_names")
    if not (names is not None and len(names) == len(classes) and y.dtype.kind in "iu"
            and np.array_equal(classes, np.arange(len(classes)))):
        names = [str(c) for c in classes]  # the original label values, as text
    return task, labels.astype(np.int64), list(names)


def _guess_task(y: np.ndarray) -> str:
    if y.dtype.kind not in "iuf":
        return "classification"  # text and bool labels cannot be regressed
    if y.dtype.kind in "iu" and len(np.unique(y)) <= MAX_CLASSES_AUTO:
        return "classification"
    return "regression"


def holdout_split(y: np.ndarray, val_fraction: float, test_fraction: float, *,
                  stratify: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted row indices (train, val, test); fractions are of all rows, 0 gives an empty part."""
    n = len(y)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 2:
        raise UserError(f"{n} rows are too few for data.val_fraction={val_fraction} and "
                        f"data.test_fraction={test_fraction}; use more rows or lower them.")
    y = np.asarray(y)
    rest, test = _cut(np.arange(n), n_test, y, stratify, seed)
    train, val = _cut(rest, n_val, y, stratify, seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _cut(idx: np.ndarray, size: int, y: np.ndarray, stratify: bool, seed: int
         ) -> tuple[np.ndarray, np.ndarray]:
    if size == 0:
        return idx, idx[:0]
    if stratify:
        try:
            return tuple(train_test_split(idx, test_size=size, stratify=y[idx],
                                          random_state=seed))
        except ValueError:  # a class too small for both sides: fall back to a plain split
            pass
    return tuple(train_test_split(idx, test_size=size, random_state=seed))


def _check_folds(k: int, n: int) -> None:
    if not 2 <= k <= n:
        raise UserError(f"the number of folds must be between 2 and the number of rows ({n}), "
                        f"got {k}; change the fold count.")


def kfold(n: int, k: int, *, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled (train, val) index pairs; the k validation folds cover every row once."""
    _check_folds(k, n)
    return iter(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n)))


def stratified_kfold(y: np.ndarray, k: int, *, seed: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like `kfold`, keeping each class's share in every fold."""
    y = np.asarray(y)
    _check_folds(k, len(y))
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        raise UserError(f"class {classes[counts.argmin()]} has only {counts.min()} rows, fewer "
                        f"than the {k} folds; use fewer folds or an unstratified k-fold.")
    return iter(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))

