"""Data: built-in datasets, file loaders, splits, k-fold, preprocessing and augmentation.

`load_arrays` turns a `DataConfig` source into raw `(X, y, meta)` arrays; `load_data` resolves
the task, splits the rows, fits the preprocessing on the training part only and returns a
`DataBundle` of float32 arrays ready to move to a device. Every mistake a user can make with
a file ends in a `UserError` with one sentence, never a pandas, numpy or zipfile traceback.
Torch and scikit-learn (about a second of scipy imports) are imported inside the functions
that use them, so importing this module, as every recipe validation does, stays light.
"""

from __future__ import annotations

import functools
import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from engine.errors import UserError
from engine.recipe import AugmentConfig, DataConfig, FeatureSelectionConfig
from engine.registry import Param, Registry
from engine.uploads import check_size, entry_parts, open_zip

if TYPE_CHECKING:
    import torch

Arrays = tuple[np.ndarray, np.ndarray, dict[str, Any]]

MAX_CLASSES_AUTO = 50  # "auto" calls integer labels with at most this many values classes
MAX_CLASSES = 1000  # beyond this a "classification" target is surely a continuous value
MAX_CATEGORIES = 1000  # a text column with more distinct values is an identifier, not a category
MAX_IMAGE_PIXELS = 40_000_000  # one image larger than this is refused before it is decoded
MIXED_SHARE = 0.5  # a text column with more than this share of numbers is numbers with typos
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

# --- built-in datasets -----------------------------------------------------------------------

DATASETS = Registry("datasets", "dataset",
                    "Built-in datasets shipped by packages; nothing is downloaded.")

# Synthetic sets take their own seed so the data stays fixed while the recipe seed varies.
_RANDOM_STATE = Param("random_state", "int", 0, "seed of the generator (fixes the data itself)",
                      low=0, high=2**31 - 1)


def _n_samples(default: int) -> Param:
    return Param("n_samples", "int", default, "rows to generate", low=20, high=1_000_000)


def _points(X: np.ndarray, y: np.ndarray) -> Arrays:
    names = [f"x{i}" for i in range(X.shape[1])]
    return X.astype(np.float32), y, {"feature_names": names, "task": "classification",
                                     "is_image": False}


@DATASETS.register("digits", "Handwritten digits 0-9 as 8x8 grayscale images (1,797 images).")
def digits() -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16 -> [0, 1]
    return X, bunch.target, {"class_names": [str(c) for c in bunch.target_names],
                             "task": "classification", "is_image": True}


def _sklearn_table(loader: str, task: str) -> Arrays:
    from sklearn import datasets

    bunch = getattr(datasets, loader)()
    meta = {"feature_names": [str(f) for f in bunch.feature_names], "task": task,
            "is_image": False}
    if task == "classification":
        meta["class_names"] = [str(c) for c in bunch.target_names]
    return bunch.data.astype(np.float32), bunch.target, meta


for _name, _task, _description in (
        ("breast_cancer", "classification",
         "Benign or malignant tumour from 30 cell measurements (569 rows)."),
        ("wine", "classification", "Grape cultivar of a wine from 13 chemical measurements "
                                   "(178 rows)."),
        ("iris", "classification", "Iris species from 4 petal and sepal measurements (150 rows)."),
        ("diabetes", "regression", "Disease progression after one year from 10 patient "
                                   "measurements (regression, 442 rows).")):
    DATASETS.register(_name, _description)(
        functools.partial(_sklearn_table, f"load_{_name}", _task))


@DATASETS.register("moons", "Two interleaving half-circles in 2-D, a small non-linear problem.",
                   params=(_n_samples(500),
                           Param("noise", "float", 0.2, "std of Gaussian noise added to points",
                                 low=0.0, high=1.0),
                           _RANDOM_STATE))
def moons(n_samples: int, noise: float, random_state: int) -> Arrays:
    from sklearn.datasets import make_moons

    return _points(*make_moons(n_samples, noise=noise, random_state=random_state))


@DATASETS.register("circles", "A small circle inside a larger one in 2-D, a non-linear problem.",
                   params=(_n_samples(500),
                           Param("noise", "float", 0.1, "std of Gaussian noise added to points",
                                 low=0.0, high=1.0),
                           Param("factor", "float", 0.5, "inner radius over outer radius",
                                 low=0.0, high=0.99),
                           _RANDOM_STATE))
def circles(n_samples: int, noise: float, factor: float, random_state: int) -> Arrays:
    from sklearn.datasets import make_circles

    return _points(*make_circles(n_samples, noise=noise, factor=factor,
                                 random_state=random_state))


@DATASETS.register("classification", "A random classification table with a chosen number of "
                   "informative features and label noise.",
                   params=(_n_samples(1000),
                           Param("n_features", "int", 20, "columns in total", low=2, high=10_000),
                           Param("n_informative", "int", 5, "columns that carry the label",
                                 low=1, high=10_000),
                           Param("n_classes", "int", 2, "number of classes", low=2, high=100),
                           Param("flip_y", "float", 0.01, "fraction of labels assigned at random "
                                 "(label noise)", low=0.0, high=1.0),
                           Param("class_sep", "float", 1.0, "distance between the classes; "
                                 "larger is easier", low=0.01, high=100.0),
                           _RANDOM_STATE))
def classification(n_samples: int, n_features: int, n_informative: int, n_classes: int,
                   flip_y: float, class_sep: float, random_state: int) -> Arrays:
    from sklearn.datasets import make_classification

    if n_informative > n_features:
        raise UserError(f"data.params.n_informative ({n_informative}) must not exceed "
                        f"data.params.n_features ({n_features}); lower it.")
    if 2 * n_classes > 2**n_informative:  # sklearn puts two clusters per class on hypercube corners
        raise UserError(f"data.params.n_informative ({n_informative}) is too small for "
                        f"{n_classes} classes; raise it to at least "
                        f"{int(np.ceil(np.log2(2 * n_classes)))}.")
    X, y = make_classification(
        n_samples, n_features, n_informative=n_informative,
        n_redundant=min(2, n_features - n_informative), n_classes=n_classes, flip_y=flip_y,
        class_sep=class_sep, random_state=random_state)
    return _points(X, y)


# --- file loaders ------------------------------------------------------------------------------

def load_arrays(cfg: DataConfig) -> Arrays:
    """Raw `(X, y, meta)` of `cfg.source`, before task resolution, splitting and scaling."""
    if cfg.source.startswith("builtin:"):
        entry = DATASETS.get(cfg.source.removeprefix("builtin:"))
        return entry.fn(**entry.resolve(cfg.params, "data.params"))
    path = Path(cfg.source)
    if not path.is_file():
        raise UserError(f"data file {cfg.source!r} does not exist; check the path or upload "
                        f"the file again.")
    check_size(path, repr(path.name))
    loaders = {".csv": _load_table, ".parquet": _load_table, ".npz": _load_npz,
               ".zip": _load_zip}
    ext = path.suffix.lower()
    if ext not in loaders:
        raise UserError(f"unsupported data file type {ext or '(no extension)'!r} for "
                        f"{path.name!r}; use .csv, .parquet, .npz or a .zip of image folders.")
    return loaders[ext](path, cfg)


def read_table(path: str | Path) -> pd.DataFrame:
    """The raw table of a .csv or .parquet file, for previews and choosing the target."""
    return _read_frame(Path(path))


def _read_frame(path: Path) -> pd.DataFrame:
    kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist; check the path or upload the "
                        f"file again.")
    check_size(path, repr(path.name))
    try:
        if kind == "CSV":
            return pd.read_csv(path)
        return pd.read_parquet(path, engine="pyarrow")
    except pd.errors.EmptyDataError:
        raise UserError(f"{kind} file {path.name!r} is empty; upload a table with a header "
                        f"row.") from None
    except (ValueError, OSError, UnicodeDecodeError, NotImplementedError, TypeError,
            IndexError, KeyError, OverflowError, RuntimeError) as exc:
        # pyarrow and pandas' C parser raise many kinds of error on damaged files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(
            exc).__name__
        raise UserError(f"{kind} file {path.name!r} could not be read ({reason}); check that it "
                        f"is a valid {kind} table.") from None


def _load_table(path: Path, cfg: DataConfig) -> Arrays:
    df = _read_frame(path)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    target = cfg.target if cfg.target is not None else (columns[-1] if columns else None)
    if target not in columns:
        raise UserError(f"target column {target!r} is not in {path.name!r}; set data.target to "
                        f"one of: {', '.join(columns)}.")
    if len(columns) < 2 or len(df) == 0:
        raise UserError(f"{path.name!r} needs at least one row and one feature column besides "
                        f"the target {target!r}; check that it is comma-separated with a header "
                        f"row.")
    df = _mixed_to_numbers(df, [c for c in columns if c != target], path.name, cfg.missing)
    numeric = [c for c in columns if is_numeric_dtype(df[c]) and not is_bool_dtype(df[c])]
    df[numeric] = df[numeric].replace([np.inf, -np.inf], np.nan)  # infinities count as missing
    feats, y = df.drop(columns=[target]), df[target]
    bad = df.isna().any(axis=1)
    if bad.any():
        if cfg.missing == "refuse":
            cols = [c for c in columns if df[c].isna().any()]
            raise UserError(f"{int(bad.sum())} of {len(df)} rows of {path.name!r} have missing "
                            f"or infinite values (columns: {', '.join(cols)}); set data.missing "
                            f"to \"drop\", \"mean\" or \"median\".")
        keep = ~bad if cfg.missing == "drop" else y.notna()  # a row without a label is useless
        feats, y = feats[keep], y[keep]
        if len(y) == 0:
            raise UserError(f"no rows of {path.name!r} are left after dropping missing values; "
                            f"set data.missing to \"mean\" or \"median\" or clean the file.")
        if cfg.missing in ("mean", "median"):
            feats = _impute(feats, cfg.missing)
    categorical = [c for c in feats.columns if c not in numeric]
    for c in categorical:
        if feats[c].nunique() > MAX_CATEGORIES:
            raise UserError(f"column {c!r} of {path.name!r} has {feats[c].nunique()} distinct "
                            f"text values, too many to one-hot encode; remove it or convert it "
                            f"to numbers.")
    feats = pd.get_dummies(feats, columns=categorical, dtype=np.float32)
    y_arr = (y.to_numpy(dtype=np.float64) if y.name in numeric
             else y.astype(str).to_numpy(dtype=object))
    return (feats.to_numpy(dtype=np.float32), y_arr,
            {"feature_names": [str(c) for c in feats.columns], "is_image": False})


def _mixed_to_numbers(df: pd.DataFrame, columns: list[str], name: str,
                      missing: str) -> pd.DataFrame:
    """Feature columns of numbers with stray text cells ("n/a", "12,5", "?"): refused with the
    row count, or, with data.missing other than "refuse", the text cells become missing values
    that the chosen option then handles."""
    for c in columns:
        if is_numeric_dtype(df[c]) or is_bool_dtype(df[c]):
            continue
        present = df[c].dropna()
        as_numbers = pd.to_numeric(present.astype(str).str.strip(), errors="coerce")
        n_numbers, n_text = int(as_numbers.notna().sum()), int(as_numbers.isna().sum())
        if n_text == 0 or n_numbers <= MIXED_SHARE * len(present):
            continue  # all numbers (parsed below), or a genuine text column
        if missing == "refuse":
            example = str(present[as_numbers.isna()].iloc[0])[:30]
            raise UserError(f"column {c!r} of {name!r} mixes numbers and text: {n_text} of "
                            f"{len(df)} rows hold text such as {example!r}; fix those cells, or "
                            f"set data.missing to \"drop\", \"mean\" or \"median\" to treat "
                            f"them as missing.")
        df[c] = pd.to_numeric(df[c].astype(str).str.strip(), errors="coerce").where(
            df[c].notna())
    return df


def _impute(feats: pd.DataFrame, how: str) -> pd.DataFrame:
    feats = feats.copy()
    for c in feats.columns:
        if not feats[c].isna().any():
            continue
        if is_numeric_dtype(feats[c]) and not is_bool_dtype(feats[c]):
            stat = feats[c].mean() if how == "mean" else feats[c].median()
            feats[c] = feats[c].fillna(0.0 if pd.isna(stat) else stat)  # an empty column -> 0
        else:  # a category has no mean: take the most frequent value
            mode = feats[c].mode()
            feats[c] = feats[c].fillna(mode.iloc[0] if len(mode) else "missing")
    return feats


def _load_npz(path: Path, cfg: DataConfig) -> Arrays:
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if not is_zip:
        raise UserError(f"{path.name!r} is not an NPZ archive; save it with "
                        f"np.savez(path, X=..., y=...).")
    _check_npy_headers(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            arrays = {k: npz[k] for k in ("X", "y") if k in files}
    except ValueError:  # numpy refuses object arrays without pickle, which we never allow
        raise UserError(f"{path.name!r} holds object (ragged) arrays, which are not loaded for "
                        f"safety; save X as one numeric array of equal-length rows and y as "
                        f"numbers or strings.") from None
    except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError,
            KeyError, IndexError, TypeError, OverflowError, MemoryError):
        raise UserError(f"{path.name!r} is not a readable NPZ archive; save it again with "
                        f"np.savez(path, X=..., y=...).") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise UserError(f"{path.name!r} has no array named {key!r} (it holds: "
                            f"{', '.join(files) or 'nothing'}); save it with "
                            f"np.savez(path, X=..., y=...).")
    X, y = arrays["X"], arrays["y"]
    if X.dtype.kind not in "biuf" or not 2 <= X.ndim <= 4:
        raise UserError(f"X in {path.name!r} must be a numeric array of 2 to 4 dimensions "
                        f"(rows first), got {X.dtype} with shape {X.shape}; convert it.")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "biufUS":
        raise UserError(f"y in {path.name!r} must hold one number or string per row, got "
                        f"{y.dtype} with shape {y.shape}; convert it.")
    if len(X) != len(y):
        raise UserError(f"X has {len(X)} rows but y has {len(y)} in {path.name!r}; give one "
                        f"label per row.")
    X = X.astype(np.float32)
    n_bad = int((~np.isfinite(X)).reshape(len(X), -1).any(axis=1).sum())
    if y.dtype.kind == "f":
        n_bad += int((~np.isfinite(y)).sum())
    if n_bad:
        raise UserError(f"{path.name!r} has {n_bad} rows with missing or infinite values; clean "
                        f"the arrays (data.missing applies to tables only).")
    y = y.astype(str) if y.dtype.kind == "S" else y
    return X, y, {"is_image": X.ndim == 4}  # (n, C, H, W) images; (n, C, L) signals


def _check_npy_headers(path: Path) -> None:
    """The archive's structure and limits, then the X and y headers: a header that declares
    more data than its entry holds would make numpy allocate it all before noticing."""
    with open_zip(path, repr(path.name), "NPZ archive") as archive:
        for info in archive.infolist():
            if info.filename not in ("X.npy", "y.npy"):
                continue
            try:
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}[version]
                    shape, _, dtype = read_header(fh, max_header_size=10_000)
                    offset = fh.tell()
            except Exception:  # numpy's header parser raises whatever the bytes provoke
                raise UserError(f"{info.filename} in {path.name!r} is not a readable array; "
                                f"save it again with np.savez(path, X=..., y=...).") from None
            need = math.prod(shape) * dtype.itemsize
            if dtype.kind != "O" and need > info.file_size - offset:
                raise UserError(f"{info.filename} in {path.name!r} declares shape {shape} of "
                                f"{dtype} ({need:,} bytes) but holds only "
                                f"{max(info.file_size - offset, 0):,}; save it again with "
                                f"np.savez.")


def _load_zip(path: Path, cfg: DataConfig) -> Arrays:
    # links, '..', absolute paths, encryption, entry count and unpacked size, from the
    # directory alone, before any entry is read; nothing is ever extracted to disk
    with open_zip(path, repr(path.name), "ZIP archive of class/image folders") as archive:
        files = []
        for info in archive.infolist():
            parts = entry_parts(info.filename)
            junk = parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)
            if not info.is_dir() and not junk:
                files.append((parts, info))
        if files and all(len(p) >= 3 for p, _ in files) and len({p[0] for p, _ in files}) == 1:
            files = [(p[1:], i) for p, i in files]  # a ZIP of one folder holding the classes
        files = [(p[0], i) for p, i in files if len(p) >= 2]  # files at the root are ignored
        class_names = sorted({c for c, _ in files})
        if len(class_names) < 2:
            raise UserError(f"{path.name!r} must hold one folder of images per class and at "
                            f"least 2 classes, found {len(class_names)}; arrange it as "
                            f"class_name/image.png.")
        images, gray = [], True
        for _, info in files:
            img = _decode(archive, info, path.name, tuple(cfg.image_size))
            gray &= img.ndim == 2
            images.append(img)
    if gray:
        X = np.stack(images)[:, None]
    else:
        X = np.stack([np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images])
        X = X.transpose(0, 3, 1, 2)
    label = {c: i for i, c in enumerate(class_names)}
    y = np.array([label[c] for c, _ in files], dtype=np.int64)
    return (X.astype(np.float32) / 255.0, y,
            {"class_names": class_names, "task": "classification", "is_image": True})


def _decode(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str,
            size: tuple[int, int]) -> np.ndarray:
    """One entry as a uint8 array resized to `size` (H, W): (H, W) if grayscale else (H, W, 3)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(archive.read(info))) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{info.filename!r} in {name!r} is {img.width}x{img.height} "
                                f"pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; shrink "
                                f"it before zipping.")
            mode = "L" if img.mode in GRAY_MODES else "RGB"
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
            img = img.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except UserError:
        raise
    except Exception:  # PIL raises whatever a damaged or forged file provokes
        raise UserError(f"{info.filename!r} in {name!r} is not an image that can be read; "
                        f"remove it or replace it with a PNG or JPEG.") from None


# --- task, splits, k-fold ----------------------------------------------------------------------

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
    from sklearn.model_selection import train_test_split

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
    from sklearn.model_selection import KFold

    _check_folds(k, n)
    return iter(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n)))


def stratified_kfold(y: np.ndarray, k: int, *, seed: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like `kfold`, keeping each class's share in every fold."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    _check_folds(k, len(y))
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        raise UserError(f"class {classes[counts.argmin()]} has only {counts.min()} rows, fewer "
                        f"than the {k} folds; use fewer folds or an unstratified k-fold.")
    return iter(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


# --- preprocessing -----------------------------------------------------------------------------

@dataclass
class Preprocess:
    """Feature selection then scaling, fitted on a training part: (x[keep] - shift) / scale."""

    keep: np.ndarray | None = None  # indices of the flattened features kept; None keeps all
    shift: np.ndarray | None = None  # per-sample input shape after selection
    scale: np.ndarray | None = None  # 1 for constant features, so they map to 0

    def apply(self, X: np.ndarray) -> np.ndarray:
        """A new float32 array; `X` is left untouched."""
        X = np.array(X, dtype=np.float32)
        if self.keep is not None:
            X = X.reshape(len(X), -1)[:, self.keep]
        if self.shift is not None:
            X = (X - self.shift) / self.scale
        return X


def fit_preprocess(X_train: np.ndarray, y_train: np.ndarray, cfg: DataConfig, *, task: str,
                   is_image: bool, seed: int) -> Preprocess:
    """Fit selection and scaling on the training part only, so no statistic sees held-out rows."""
    X = np.asarray(X_train, dtype=np.float64)  # float64 statistics, stored as float32
    keep = None
    if cfg.feature_selection is not None:
        if is_image or X.ndim != 2:
            raise UserError("data.feature_selection applies to tables only; set it to null for "
                            "image and signal data.")
        keep = _select(X, y_train, cfg.feature_selection, task, seed)
        X = X[:, keep]
    if not cfg.standardize:
        return Preprocess(keep)
    lo, hi = X.min(axis=0), X.max(axis=0)
    if cfg.standardize == "minmax":
        shift, scale = lo, hi - lo
    else:
        shift, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(hi > lo, scale, 1.0)  # exact test: a float std of a constant may not be 0
    return Preprocess(keep, shift.astype(np.float32), scale.astype(np.float32))


def _select(X: np.ndarray, y: np.ndarray, fs: FeatureSelectionConfig, task: str,
            seed: int) -> np.ndarray:
    from sklearn import feature_selection as skfs

    if fs.method == "variance":
        try:
            return skfs.VarianceThreshold(fs.threshold).fit(X).get_support(indices=True)
        except ValueError:  # sklearn's way of saying that no feature passes
            raise UserError(f"data.feature_selection.threshold={fs.threshold} drops every "
                            f"feature (largest training variance {X.var(axis=0).max():.4g}); "
                            f"lower it.") from None
    score = (skfs.mutual_info_classif if task == "classification"
             else skfs.mutual_info_regression)
    selector = skfs.SelectKBest(functools.partial(score, random_state=seed),
                           k=min(fs.k, X.shape[1]))
    return selector.fit(X, y).get_support(indices=True)


# --- the bundle --------------------------------------------------------------------------------

@dataclass
class DataBundle:
    """The three parts of a dataset, preprocessed, with what a model and a page need to know."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    task: str  # "classification" or "regression"
    n_classes: int  # 0 for regression
    input_shape: tuple[int, ...]  # one sample after preprocessing: (1, 8, 8), (30,)
    is_image: bool
    feature_names: list[str] | None  # after feature selection
    class_names: list[str] | None
    preprocess: Preprocess
    source: str
    n_raw_features: int  # before feature selection
    X_test_raw: np.ndarray | None = None  # the test part as a user has it: what an exported
    #                                       model with its preprocessing inside takes

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "task": self.task,
            "rows": {"train": len(self.y_train), "val": len(self.y_val),
                     "test": len(self.y_test)},
            "input_shape": list(self.input_shape), "n_features": self.n_features,
            "n_raw_features": self.n_raw_features, "is_image": self.is_image}
        if self.task == "classification":
            counts = np.bincount(self.y_train, minlength=self.n_classes)
            names = self.class_names or [str(i) for i in range(self.n_classes)]
            out["classes"] = {name: int(c) for name, c in zip(names, counts, strict=True)}
        return out


def load_data(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Load, split (stratified for classes) and preprocess; the same cfg and seed give the same
    bundle."""
    X, y, meta = load_arrays(cfg)
    task, y, class_names = resolve_task(y, cfg.task, meta)
    is_image = bool(meta.get("is_image"))
    if cfg.augment is not None and not is_image:
        raise UserError("data.augment applies to images only; set it to null for this data.")
    train, val, test = holdout_split(y, cfg.val_fraction, cfg.test_fraction,
                                     stratify=task == "classification", seed=seed)
    prep = fit_preprocess(X[train], y[train], cfg, task=task, is_image=is_image, seed=seed)
    names = meta.get("feature_names")
    if names is not None and prep.keep is not None:
        names = [names[i] for i in prep.keep]
    X_train = prep.apply(X[train])
    return DataBundle(
        X_train, y[train], prep.apply(X[val]), y[val], prep.apply(X[test]), y[test],
        task=task, n_classes=len(class_names) if class_names else 0,
        input_shape=tuple(X_train.shape[1:]), is_image=is_image,
        feature_names=list(names) if names is not None else None, class_names=class_names,
        preprocess=prep, source=cfg.source, n_raw_features=int(np.prod(X.shape[1:])),
        X_test_raw=X[test].astype(np.float32))


# --- augmentation ------------------------------------------------------------------------------

def augment(xb: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flips and shifts of an image batch (B, C, H, W) on its own device; returns a new
    tensor and leaves `xb` untouched."""
    import torch

    if xb.ndim != 4:
        raise ValueError(f"augment expects an image batch (B, C, H, W), got shape "
                         f"{tuple(xb.shape)}")
    if not cfg.flip and cfg.shift == 0:
        return xb.clone()
    # One gather from the zero-padded batch does both: every output pixel (i, j) of sample b
    # reads padded pixel (i + dy_b, j + dx_b), with the column mirrored for flipped samples
    # (flipping the padded image equals padding the flipped one). No loop over samples.
    B, C, H, W = xb.shape
    s, dev = cfg.shift, xb.device
    padded = torch.nn.functional.pad(xb, (s, s, s, s)) if s else xb
    Wp = W + 2 * s
    rows = torch.arange(H, device=dev).expand(B, H)
    cols = torch.arange(W, device=dev).expand(B, W)
    if s:
        off = torch.randint(0, 2 * s + 1, (B, 2), generator=generator, device=dev)
        rows, cols = rows + off[:, :1], cols + off[:, 1:]
    if cfg.flip:
        flip = torch.rand(B, generator=generator, device=dev) < 0.5
        cols = torch.where(flip[:, None], Wp - 1 - cols, cols)
    index = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W)
    out = padded.reshape(B, C, -1).gather(2, index.expand(B, C, H * W))
    return out.reshape(B, C, H, W)


def preview(cfg: DataConfig, *, seed: int, rows: int = 10, images: int = 16) -> dict[str, Any]:
    """What the Data page shows: the summary, the first raw rows or sample images."""
    bundle = load_data(cfg, seed=seed)
    out = bundle.summary()
    if bundle.is_image:  # raw pixels: per-pixel scaling would make the digits unreadable
        X, y, meta = load_arrays(cfg)
        _, labels, names = resolve_task(y[:images], bundle.task, meta)
        out["images"] = list(X[:images])
        out["image_labels"] = [names[int(v)] if names else f"{float(v):.3g}" for v in labels]
        return out
    path = Path(cfg.source)
    if path.suffix.lower() in (".csv", ".parquet"):
        head = read_table(path).head(rows)
    else:
        X, y, meta = load_arrays(cfg)
        flat = X[:rows].reshape(min(rows, len(X)), -1)
        names = meta.get("feature_names") or [f"x{i}" for i in range(flat.shape[1])]
        head = pd.DataFrame(flat, columns=names)
        head["target"] = y[:rows]
    out["head"] = head.to_dict(orient="list")
    return out
