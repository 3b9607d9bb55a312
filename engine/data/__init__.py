"""Data: built-in datasets, file loaders, splits, k-fold, preprocessing and augmentation.

`load_arrays` turns a `DataConfig` source into raw `(X, y, meta)` arrays; `load_data`
resolves the task, splits the rows, fits the preprocessing on the training part only and
returns a `DataBundle` of float32 arrays ready to move to a device. The parts, in reading
order: `datasets` (the built-in registry), `loaders` (files), `splits` (task, holdout,
k-fold), `preprocess` (selection, scaling, augmentation), `bundle` (the whole).
"""

from __future__ import annotations

from engine.data.bundle import DataBundle, describe_encoding, load_data, preview, subset
from engine.data.datasets import DATASETS, Arrays
from engine.data.loaders import default_target, load_arrays, read_table
from engine.data.preprocess import Preprocess, augment, fit_preprocess
from engine.data.splits import (
    MAX_CLASSES,
    MAX_CLASSES_AUTO,
    holdout_split,
    kfold,
    resolve_task,
    stratified_kfold,
)

__all__ = ["DATASETS", "MAX_CLASSES", "MAX_CLASSES_AUTO", "Arrays", "DataBundle",
           "Preprocess", "augment", "default_target", "describe_encoding", "fit_preprocess",
           "holdout_split", "kfold", "load_arrays", "load_data", "preview", "read_table",
           "resolve_task", "stratified_kfold", "subset"]
