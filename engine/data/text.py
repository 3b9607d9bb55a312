"""Text data: a table's text column (`data.text`) with an optional label column, and the
token ids a model's tokenizer makes of it (`engine.hf_text.tokenize`, once per load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from engine.data.datasets import Arrays
from engine.errors import UserError
from engine.recipe import DataConfig


def text_table(df: pd.DataFrame, path: Path, cfg: DataConfig, target: str | None) -> Arrays:
    """`(texts, labels, meta)` of a table with a text column; labels are placeholders for a
    label-free run (`data.labels: "teacher"`)."""
    columns = [str(c) for c in df.columns]
    if cfg.text not in columns:
        raise UserError(f"text column {cfg.text!r} is not in {path.name!r}; set data.text to one "
                        f"of: {', '.join(columns)}.")
    texts = df[cfg.text]
    empty = texts.isna() | (texts.astype(str).str.strip() == "")
    if empty.any():
        first = int(np.flatnonzero(empty.to_numpy())[0])
        raise UserError(f"{int(empty.sum())} of {len(df)} rows of {path.name!r} have an empty "
                        f"{cfg.text!r} text (the first at line {first + 2} of the file); fill "
                        f"them in or remove those rows.")
    meta = {"is_text": True, "is_image": False, "text_column": cfg.text}
    out = texts.astype(str).to_numpy(dtype=object)
    if cfg.labels == "teacher":
        return out, np.zeros(len(out), dtype=np.int64), meta
    if target is None or target == cfg.text or target not in columns:
        others = [c for c in columns if c != cfg.text]
        raise UserError(f"{path.name!r} has no label column {target!r} beside the text "
                        f"{cfg.text!r}; set data.target to one of: {', '.join(others) or '(none)'}"
                        f", or data.labels to \"teacher\" to score agreement with the model.")
    y = df[target]
    if y.isna().any():
        if cfg.missing == "refuse":
            raise UserError(f"{int(y.isna().sum())} of {len(df)} rows of {path.name!r} have no "
                            f"label in {target!r}; set data.missing to \"drop\" or fill them in.")
        keep = y.notna().to_numpy()
        out, y = out[keep], y[keep]
    numeric = pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    labels = y.to_numpy(dtype=np.float64) if numeric else y.astype(str).to_numpy(dtype=object)
    return out, labels, meta
