"""File loaders: a `DataConfig` source as raw `(X, y, meta)` arrays.

CSV and Parquet tables (a target column, missing values refused or handled, text columns
one-hot encoded), NPZ archives (`X` and `y`, never unpickled) and ZIPs of `class/image`
folders (checked by `engine.uploads` before any entry is read). Every mistake a user can
make with a file ends in a `UserError` with one sentence, never a pandas, numpy or zipfile
traceback.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from PIL import Image, ImageOps

from engine.data.datasets import DATASETS, Arrays
from engine.data.text import text_table
from engine.errors import UserError
from engine.recipe import DataConfig
from engine.uploads import check_size, entry_parts, open_zip

MAX_CATEGORIES = 1000  # a text column with more distinct values is an identifier, not a category
MAX_IMAGE_PIXELS = 40_000_000  # one image larger than this is refused before it is decoded
MIXED_SHARE = 0.5  # a text column with more than this share of numbers is numbers with typos
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# names a label column goes by, in the order they are looked for
LABEL_NAMES = ("target", "label", "labels", "class", "species", "y", "outcome", "diagnosis",
               "category", "survived", "churn")


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
    if cfg.text is not None and path.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"data.text names a text column of a table, and {path.name!r} is not a "
                        f".csv or .parquet file; set data.text to null for this data.")
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


def default_target(columns: list[str]) -> str | None:
    """The column a table's label most likely sits in: the first named like one (`target`,
    `label`, `class`, `species`, `y`, ...), else the last column."""
    for name in LABEL_NAMES:
        for column in columns:
            if column.strip().lower() == name:
                return column
    return columns[-1] if columns else None


def _load_table(path: Path, cfg: DataConfig) -> Arrays:
    df = _read_frame(path)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    if cfg.text is not None:
        target = cfg.target if cfg.target is not None else default_target(
            [c for c in columns if c != cfg.text])
        return text_table(df, path, cfg, target)
    target = cfg.target if cfg.target is not None else default_target(columns)
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
    dummies = {f"{c}={v}": (c, v) for c in categorical
               for v in pd.Categorical(feats[c]).categories}
    feats = pd.get_dummies(feats, columns=categorical, dtype=np.float32, prefix_sep="=")
    encoding = [{"name": str(c), "column": str(dummies[c][0]), "equals": str(dummies[c][1])}
                if c in dummies else {"name": str(c), "column": str(c)} for c in feats.columns]
    y_arr = (y.to_numpy(dtype=np.float64) if y.name in numeric
             else y.astype(str).to_numpy(dtype=object))
    return (feats.to_numpy(dtype=np.float32), y_arr,
            {"feature_names": [str(c) for c in feats.columns], "is_image": False,
             "encoding": encoding})


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
    if "y" not in arrays and "X" in arrays and cfg.labels == "teacher":
        arrays["y"] = np.zeros(len(arrays["X"]), dtype=np.int64)  # the teacher labels them
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
        if cfg.labels == "teacher":  # unlabeled: any folder layout, one placeholder class
            files = [(("",), i) for _, i in files]
        files = [(p[0], i) for p, i in files if len(p) >= 2 or cfg.labels == "teacher"]
        class_names = sorted({c for c, _ in files})
        if len(class_names) < 2 and cfg.labels != "teacher":
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

