"""Preprocessing fitted on the training part only (feature selection, then scaling), and
image augmentation applied per batch on the device."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from sklearn import feature_selection as skfs

from engine.errors import UserError
from engine.recipe import AugmentConfig, DataConfig, FeatureSelectionConfig


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



def augment(xb: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flips and shifts of an image batch (B, C, H, W) on its own device; returns a new
    tensor and leaves `xb` untouched."""
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

