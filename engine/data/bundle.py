"""The data bundle: a dataset loaded, split and preprocessed, ready for a device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.data.loaders import load_arrays, read_table
from engine.data.preprocess import Preprocess, fit_preprocess
from engine.data.splits import holdout_split, resolve_task
from engine.errors import UserError
from engine.hf_text import is_text_folder, load_tokenizer, tokenize, tokenizer_source
from engine.recipe import DataConfig, short_source


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
    # a table's model inputs, in order, each a numeric column as it is or one category of a
    # text column as 1/0: {"name", "column"[, "equals"]} (what an exported model takes)
    encoding: list[dict[str, str]] | None = None
    X_test_raw: np.ndarray | None = None  # the test part as a user has it: what an exported
    #                                       model with its preprocessing inside takes
    labels: str = "data"  # "teacher": y holds the original model's predictions
    text: dict[str, Any] | None = None  # text data: how it was tokenized (tokenizer,
    #                                     max_length, tokens, truncated, lengths, note)

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_outputs(self) -> int:
        """The model's output width: one logit per class, one value for regression, or the
        width of the vectors a label-free teacher gave as targets."""
        if self.task == "classification":
            return self.n_classes
        return int(self.y_train.shape[1]) if self.y_train.ndim == 2 else 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "task": self.task,
            "rows": {"train": len(self.y_train), "val": len(self.y_val),
                     "test": len(self.y_test)},
            "input_shape": list(self.input_shape), "n_features": self.n_features,
            "n_raw_features": self.n_raw_features, "is_image": self.is_image,
            "n_out": self.n_outputs, "labels": self.labels}
        if self.encoding is not None:
            out["encoding"] = self.encoding
        if self.text is not None:
            out["text"] = {k: v for k, v in self.text.items() if k != "lengths"}
        if self.task == "classification":
            counts = np.bincount(self.y_train, minlength=self.n_classes)
            names = self.class_names or [str(i) for i in range(self.n_classes)]
            out["classes"] = {name: int(c) for name, c in zip(names, counts, strict=True)}
        return out


def load_data(cfg: DataConfig, *, seed: int, model_source: str | None = None) -> DataBundle:
    """Load, split (stratified for classes) and preprocess; the same cfg and seed give the same
    bundle. Text is tokenized by `data.tokenizer`, else by the model's (`model_source`)."""
    X, y, meta = load_arrays(cfg)
    text = None
    if meta.get("is_text"):
        X, text = _tokenized(X, cfg, model_source)
    if cfg.labels == "teacher":  # placeholders: `relabel` puts the teacher's labels in
        task, y, class_names = "classification", np.zeros(len(X), dtype=np.int64), None
    elif cfg.label_space == "model":  # indices into the model's outputs, as they are
        task, y, class_names = "classification", model_indices(y, cfg.source), None
    else:
        task, y, class_names = resolve_task(y, cfg.task, meta)
    is_image = bool(meta.get("is_image"))
    if cfg.augment is not None and not is_image:
        raise UserError("data.augment applies to images only; set it to null for this data.")
    train, val, test = holdout_split(y, cfg.val_fraction, cfg.test_fraction,
                                     stratify=task == "classification" and
                                     cfg.labels == "data", seed=seed)
    prep = Preprocess() if text is not None else fit_preprocess(
        X[train], y[train], cfg, task=task, is_image=is_image, seed=seed)
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
        X_test_raw=X[test].astype(np.float32),
        encoding=None if text is not None else _encoding(meta, is_image, X),
        labels=cfg.labels, text=text)


def _tokenized(texts: np.ndarray, cfg: DataConfig,
               model_source: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Token ids of every text by the tokenizer of `data.tokenizer`, else the model's."""
    if cfg.feature_selection is not None:
        raise UserError("data.feature_selection applies to numeric tables, not to text; set "
                        "it to null for this data.")
    source = cfg.tokenizer or model_source
    if source is not None and source.startswith("hf:") and not is_text_folder(source):
        load_tokenizer(source)  # a Hugging Face folder without one: says which files it lacks
    source = tokenizer_source(source) if source is not None else None
    if source is None:
        raise UserError("text data needs a tokenizer to turn it into token ids: pick a Hugging "
                        "Face text model (a folder with its tokenizer) as the model, or set "
                        "data.tokenizer to one.")
    return tokenize(texts, source, cfg.max_length)



def preview(cfg: DataConfig, *, seed: int, rows: int = 10, images: int = 16,
            model_source: str | None = None) -> dict[str, Any]:
    """What the Data page shows: the summary, the first raw rows or sample images; for text,
    the first texts beside their tokens and every text's length in tokens."""
    bundle = load_data(cfg, seed=seed, model_source=model_source)
    out = bundle.summary()
    if bundle.text is not None:
        texts, y, meta = load_arrays(cfg)
        tokenizer = load_tokenizer(bundle.text["tokenizer"])
        ids, _ = tokenize(texts[:rows], bundle.text["tokenizer"], cfg.max_length)
        pad = bundle.text["pad_id"]
        out["head"] = {"text": [str(t) for t in texts[:rows]],
                       "tokens": [" ".join(tokenizer.convert_ids_to_tokens(
                           [int(i) for i in row if i != pad])) for row in ids],
                       "length": bundle.text["lengths"][:rows]}
        if cfg.labels == "data":
            out["head"]["label"] = [str(v) for v in y[:rows]]
        out["lengths"] = bundle.text["lengths"]
        return out
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


def describe_encoding(encoding: list[dict[str, str]] | None) -> str | None:
    """How a table's columns became the model's inputs, in a sentence; None when every
    column is a number that goes in as it is."""
    if not encoding:
        return None
    text: dict[str, list[str]] = {}
    for e in encoding:
        if "equals" in e:
            text.setdefault(e["column"], []).append(e["equals"])
    if not text:
        return None
    columns = len({e["column"] for e in encoding})
    parts = [f"{c} into {len(v)} ({', '.join(v[:6])}{', ...' if len(v) > 6 else ''})"
             for c, v in text.items()]
    return (f"{columns} columns become {len(encoding)} inputs: text columns are one-hot "
            f"encoded ({'; '.join(parts)}), one input per value, 1 when the row has it; the "
            f"other columns go in as numbers. The exported model takes this layout, "
            f"input by input, and its predict.py builds it from your CSV rows.")


def _encoding(meta: dict[str, Any], is_image: bool, X: np.ndarray) -> list[dict[str, str]] | None:
    """A table's inputs in order: a file's one-hot layout, or a built-in's numeric columns."""
    if meta.get("encoding") is not None:
        return meta["encoding"]
    names = meta.get("feature_names")
    if is_image or X.ndim != 2 or not names:
        return None
    return [{"name": str(n), "column": str(n)} for n in names]


def subset(data: DataBundle, idx: np.ndarray) -> DataBundle:
    """The bundle with its training part cut to the rows `idx` (validation and test kept)."""
    return dataclasses.replace(data, X_train=data.X_train[idx], y_train=data.y_train[idx])


def model_indices(y: np.ndarray, source: str) -> np.ndarray:
    """Integer labels kept as indices into a model's outputs (data.label_space "model")."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise UserError(f"data.label_space \"model\" takes labels that are output indices "
                        f"(whole numbers from 0), and {short_source(source)} has "
                        f"{y.dtype} labels; use data.label_space \"data\".")
    return y.astype(np.int64)

