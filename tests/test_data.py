"""engine.data: built-ins, file round-trips, splits, preprocessing, bad inputs, augmentation."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engine.data import (
    DATASETS,
    augment,
    holdout_split,
    kfold,
    load_arrays,
    load_data,
    preview,
    stratified_kfold,
)
from engine.errors import UserError
from engine.recipe import AugmentConfig, DataConfig, FeatureSelectionConfig
from engine.sections import resolve_data

SHAPES = {"digits": (1, 8, 8), "shapes": (3, 32, 32), "breast_cancer": (30,), "wine": (13,),
          "iris": (4,), "diabetes": (10,), "moons": (2,), "circles": (2,), "classification": (20,)}


def table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(5, 2, n), "b": rng.normal(-1, 3, n),
                         "color": rng.choice(["red", "green", "blue"], n),
                         "label": rng.choice(["cat", "dog"], n)})


def write_zip(path, classes: dict[str, int], mode: str = "L", size: int = 6) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for name, count in classes.items():
            for i in range(count):
                shape = (size, size) if mode == "L" else (size, size, 3)
                img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                zf.writestr(f"{name}/{i}.png", buf.getvalue())


# --- built-ins -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DATASETS.names())
def test_builtin_loads(name):
    cfg = DataConfig(source=f"builtin:{name}")
    if name == "reviews":  # text: token ids need a model's tokenizer (tests/test_text.py)
        with pytest.raises(UserError, match="text data needs a tokenizer"):
            load_data(cfg, seed=0)
        return
    bundle = load_data(cfg, seed=0)
    assert bundle.input_shape == SHAPES[name]
    assert bundle.X_train.dtype == np.float32 and bundle.X_train.shape[1:] == SHAPES[name]
    assert bundle.task == ("regression" if name == "diabetes" else "classification")
    assert bundle.is_image == (name in ("digits", "shapes"))
    if bundle.task == "classification":
        assert bundle.y_train.dtype == np.int64 and bundle.n_classes == len(bundle.class_names)
    else:
        assert bundle.y_train.dtype == np.float32 and bundle.n_classes == 0
    assert sum(bundle.summary()["rows"].values()) == len(load_arrays(cfg)[1])


def test_builtin_params_validate_and_fill_defaults():
    cfg = resolve_data(DataConfig(source="builtin:moons", params={"noise": 0.3}))
    assert cfg.params == {"n_samples": 500, "noise": 0.3, "random_state": 0}
    with pytest.raises(UserError, match="noise"):
        resolve_data(DataConfig(source="builtin:moons", params={"noise": 5.0}))
    X, _, _ = load_arrays(DataConfig(source="builtin:classification",
                                     params={"n_samples": 100, "n_features": 7}))
    assert X.shape == (100, 7)


# --- splits --------------------------------------------------------------------------------

def test_holdout_split_sizes_and_stratification():
    y = np.repeat([0, 1, 2], [300, 150, 50])
    train, val, test = holdout_split(y, 0.2, 0.2, stratify=True, seed=0)
    assert (len(train), len(val), len(test)) == (300, 100, 100)
    assert len(np.unique(np.concatenate([train, val, test]))) == 500
    whole = np.bincount(y) / len(y)
    for part in (train, val, test):
        assert np.abs(np.bincount(y[part], minlength=3) / len(part) - whole).max() < 0.05
    train, val, test = holdout_split(y, 0.0, 0.3, stratify=True, seed=0)
    assert len(val) == 0 and len(test) == 150 and len(train) == 350


def test_holdout_split_falls_back_when_a_class_is_tiny():
    y = np.array([0] * 20 + [1] * 20 + [2])  # class 2 cannot be on both sides
    train, val, test = holdout_split(y, 0.2, 0.2, stratify=True, seed=0)
    assert len(train) + len(val) + len(test) == len(y)


def test_kfold_folds_are_disjoint_and_cover():
    folds = list(kfold(23, 5, seed=1))
    val = np.concatenate([v for _, v in folds])
    assert len(folds) == 5 and np.array_equal(np.sort(val), np.arange(23))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 23
    with pytest.raises(UserError, match="folds"):
        kfold(3, 5, seed=0)


def test_stratified_kfold_keeps_proportions():
    y = np.repeat([0, 1], [80, 20])
    folds = list(stratified_kfold(y, 4, seed=0))
    assert np.array_equal(np.sort(np.concatenate([v for _, v in folds])), np.arange(100))
    for _, va in folds:
        assert abs(y[va].mean() - 0.2) < 0.05
    with pytest.raises(UserError, match="fewer"):
        stratified_kfold(np.array([0] * 10 + [1] * 2), 3, seed=0)


# --- preprocessing -------------------------------------------------------------------------

def test_standardize_fits_on_train_only():
    cfg = DataConfig(source="builtin:breast_cancer")
    bundle = load_data(cfg, seed=0)
    X, y, _ = load_arrays(cfg)
    train, _, test = holdout_split(y, 0.2, 0.2, stratify=True, seed=0)
    np.testing.assert_allclose(bundle.preprocess.shift, X[train].mean(0), rtol=1e-5)
    np.testing.assert_allclose(bundle.X_train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(bundle.X_train.std(0), 1, atol=1e-3)
    expected = (X[test] - X[train].mean(0)) / X[train].std(0)
    np.testing.assert_allclose(bundle.X_test, expected, rtol=1e-3, atol=1e-3)
    assert abs(bundle.X_test.mean()) > 1e-4  # test rows are not re-centred on themselves


def test_minmax_and_none():
    bundle = load_data(DataConfig(source="builtin:wine", standardize="minmax"), seed=0)
    assert bundle.X_train.min() == 0 and bundle.X_train.max() == pytest.approx(1)
    raw = load_data(DataConfig(source="builtin:wine", standardize=False), seed=0)
    assert raw.preprocess.shift is None and raw.X_train.max() > 100


def test_variance_threshold_drops_constant_columns(tmp_path):
    df = table()
    df["const"] = 3.0
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg = DataConfig(source=str(tmp_path / "t.csv"), target="label",
                     feature_selection=FeatureSelectionConfig("variance", 0.0))
    bundle = load_data(cfg, seed=0)
    assert "const" not in bundle.feature_names
    assert bundle.n_features == bundle.n_raw_features - 1 == len(bundle.feature_names)
    with pytest.raises(UserError, match="threshold"):
        load_data(DataConfig(source=str(tmp_path / "t.csv"), target="label",
                             feature_selection=FeatureSelectionConfig("variance", 1e6)), seed=0)


def test_kbest_keeps_k_features():
    cfg = DataConfig(source="builtin:breast_cancer",
                     feature_selection=FeatureSelectionConfig("kbest", k=5))
    bundle = load_data(cfg, seed=0)
    assert bundle.input_shape == (5,) and len(bundle.feature_names) == 5
    assert bundle.n_raw_features == 30 and bundle.preprocess.keep.shape == (5,)
    with pytest.raises(UserError, match="tables"):
        load_data(DataConfig(source="builtin:digits",
                             feature_selection=FeatureSelectionConfig("kbest", k=5)), seed=0)


# --- file round-trips ----------------------------------------------------------------------

def test_csv_one_hot_and_string_target(tmp_path):
    df = table()
    df.to_csv(tmp_path / "t.CSV", index=False)
    X, _, meta = load_arrays(DataConfig(source=str(tmp_path / "t.CSV"), target="label"))
    assert meta["feature_names"] == ["a", "b", "color=blue", "color=green", "color=red"]
    np.testing.assert_allclose(X[:, 0], df["a"], rtol=1e-6)
    assert X[:, 2:].sum(1).tolist() == [1.0] * len(df)
    bundle = load_data(DataConfig(source=str(tmp_path / "t.CSV"), target="label"), seed=0)
    assert bundle.class_names == ["cat", "dog"] and bundle.task == "classification"
    all_y = np.concatenate([bundle.y_train, bundle.y_val, bundle.y_test])
    assert np.bincount(all_y).tolist() == [(df.label == "cat").sum(), (df.label == "dog").sum()]


def test_parquet_round_trip_and_regression_target(tmp_path):
    df = table().drop(columns=["label"])
    df["price"] = np.linspace(0, 10, len(df))  # float target, last column -> regression
    df.to_parquet(tmp_path / "t.parquet")
    bundle = load_data(DataConfig(source=str(tmp_path / "t.parquet"), standardize=False), seed=0)
    assert bundle.task == "regression" and bundle.y_train.dtype == np.float32
    assert bundle.input_shape == (5,)
    got = np.sort(np.concatenate([bundle.y_train, bundle.y_val, bundle.y_test]))
    np.testing.assert_allclose(got, df["price"], rtol=1e-6)


def test_npz_round_trip_remaps_labels_and_keeps_signal_shape(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2, 16)).astype(np.float32)
    y = np.repeat([10, 20, 30, 40], 10)
    np.savez(tmp_path / "s.npz", X=X, y=y)
    bundle = load_data(DataConfig(source=str(tmp_path / "s.npz"), standardize=False), seed=0)
    assert bundle.input_shape == (2, 16) and not bundle.is_image
    assert bundle.class_names == ["10", "20", "30", "40"]
    assert set(bundle.y_train) == {0, 1, 2, 3}
    Xr, yr, _ = load_arrays(DataConfig(source=str(tmp_path / "s.npz")))
    assert np.array_equal(Xr, X) and np.array_equal(yr, y)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_zip_of_images_round_trip(tmp_path, mode, channels):
    write_zip(tmp_path / "imgs.zip", {"b_dogs": 6, "a_cats": 4}, mode=mode)
    cfg = DataConfig(source=str(tmp_path / "imgs.zip"), image_size=(8, 10))
    X, y, meta = load_arrays(cfg)
    assert X.shape == (10, channels, 8, 10) and X.dtype == np.float32
    assert X.min() >= 0 and X.max() <= 1 and meta["is_image"]
    assert meta["class_names"] == ["a_cats", "b_dogs"] and np.bincount(y).tolist() == [4, 6]
    bundle = load_data(cfg, seed=0)
    assert bundle.input_shape == (channels, 8, 10) and bundle.is_image


def test_same_cfg_and_seed_give_the_same_bundle():
    cfg = DataConfig(source="builtin:classification", params={"n_samples": 200})
    a, b = load_data(cfg, seed=3), load_data(cfg, seed=3)
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    c = load_data(cfg, seed=4)
    assert not np.array_equal(a.y_train, c.y_train) or not np.array_equal(a.X_train, c.X_train)


# --- missing values and bad inputs ---------------------------------------------------------

def test_missing_values(tmp_path):
    df = table()
    df.loc[[1, 5], "a"] = np.nan
    df.loc[7, "b"] = np.inf
    df.to_csv(tmp_path / "m.csv", index=False)
    src = str(tmp_path / "m.csv")
    with pytest.raises(UserError, match=r"3 of 60 rows.*data\.missing"):
        load_arrays(DataConfig(source=src, target="label"))
    X, _, _ = load_arrays(DataConfig(source=src, target="label", missing="drop"))
    assert X.shape[0] == 57
    X, _, _ = load_arrays(DataConfig(source=src, target="label", missing="mean"))
    assert X.shape[0] == 60 and np.isfinite(X).all()
    assert X[1, 0] == pytest.approx(df["a"].drop([1, 5]).mean(), rel=1e-5)


def bad(tmp_path, name: str, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def test_bad_table_inputs(tmp_path):
    table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match="one of: a, b, color, label"):
        load_arrays(DataConfig(source=str(tmp_path / "t.csv"), target="species"))
    src = bad(tmp_path, "p.csv", b"a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(UserError, match="could not be read"):
        load_arrays(DataConfig(source=src))
    df = table().assign(label=1.0)
    df.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(UserError, match="constant"):
        load_data(DataConfig(source=str(tmp_path / "c.csv"), task="regression"), seed=0)
    with pytest.raises(UserError, match="single class"):
        load_data(DataConfig(source=str(tmp_path / "c.csv")), seed=0)
    with pytest.raises(UserError, match="does not exist"):
        load_arrays(DataConfig(source=str(tmp_path / "nope.csv")))
    with pytest.raises(UserError, match="unsupported"):
        load_arrays(DataConfig(source=bad(tmp_path, "x.xlsx", b"hello")))


def test_bad_npz_inputs(tmp_path):
    ragged = np.array([np.zeros(3), np.zeros(5)], dtype=object)
    np.savez(tmp_path / "o.npz", X=ragged, y=np.array([0, 1]))
    with pytest.raises(UserError, match="object"):
        load_arrays(DataConfig(source=str(tmp_path / "o.npz")))
    np.savez(tmp_path / "n.npz", X=np.zeros((4, 2)))
    with pytest.raises(UserError, match="'y'"):
        load_arrays(DataConfig(source=str(tmp_path / "n.npz")))
    np.savez(tmp_path / "l.npz", X=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(UserError, match="rows"):
        load_arrays(DataConfig(source=str(tmp_path / "l.npz")))
    with pytest.raises(UserError, match="NPZ"):
        load_arrays(DataConfig(source=bad(tmp_path, "g.npz", b"garbage bytes")))


def test_bad_zip_inputs(tmp_path):
    with pytest.raises(UserError, match="not a valid ZIP"):
        load_arrays(DataConfig(source=bad(tmp_path, "x.zip", b"garbage, not a zip")))
    write_zip(tmp_path / "one.zip", {"cats": 3})
    with pytest.raises(UserError, match="at least 2 classes"):
        load_arrays(DataConfig(source=str(tmp_path / "one.zip")))
    write_zip(tmp_path / "evil.zip", {"cats": 2, "dogs": 2})
    with zipfile.ZipFile(tmp_path / "evil.zip", "a") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(UserError, match="unsafe"):
        load_arrays(DataConfig(source=str(tmp_path / "evil.zip")))
    write_zip(tmp_path / "txt.zip", {"cats": 2, "dogs": 2})
    with zipfile.ZipFile(tmp_path / "txt.zip", "a") as zf:
        zf.writestr("dogs/notes.txt", b"not an image")
    with pytest.raises(UserError, match=r"notes\.txt.*not an image"):
        load_arrays(DataConfig(source=str(tmp_path / "txt.zip")))


def test_zip_limits_are_checked_before_reading(tmp_path, monkeypatch):
    write_zip(tmp_path / "imgs.zip", {"cats": 2, "dogs": 2})
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_ENTRIES", "3")
    with pytest.raises(UserError, match="4 entries, more than the 3"):
        load_arrays(DataConfig(source=str(tmp_path / "imgs.zip")))
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_ENTRIES", "10")
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_MB", "1")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "a") as zf:  # stored: no bomb, just large
        zf.writestr("dogs/big.raw", bytes(2 << 20), compress_type=zipfile.ZIP_STORED)
    with pytest.raises(UserError, match=r"unpacks to 2\.0 MB, more than the 1\.0 MB"):
        load_arrays(DataConfig(source=str(tmp_path / "imgs.zip")))


def test_augment_refused_for_tables():
    with pytest.raises(UserError, match="images only"):
        load_data(DataConfig(source="builtin:iris", augment=AugmentConfig()), seed=0)


# --- augmentation --------------------------------------------------------------------------

def test_augment_flip_gives_itself_or_its_mirror():
    torch = pytest.importorskip("torch")
    xb = torch.rand(64, 2, 5, 7)
    before = xb.clone()
    out = augment(xb, AugmentConfig(flip=True, shift=0), torch.Generator().manual_seed(0))
    assert out.shape == xb.shape and torch.equal(xb, before)
    same = (out == xb).flatten(1).all(1)
    mirror = (out == xb.flip(-1)).flatten(1).all(1)
    assert bool((same | mirror).all()) and 0 < int(mirror.sum()) < 64


@pytest.mark.parametrize("flip", [False, True])
def test_augment_shift_moves_rows_with_zero_fill(flip):
    torch = pytest.importorskip("torch")
    xb = torch.rand(64, 1, 6, 6) + 1  # strictly positive, so zero fill is visible
    out = augment(xb, AugmentConfig(flip=flip, shift=1), torch.Generator().manual_seed(0))
    candidates = [torch.nn.functional.pad(xb, (1, 1, 1, 1))]
    if flip:
        candidates.append(candidates[0].flip(-1))
    seen = set()
    for b in range(len(xb)):
        matches = [(k, dy, dx) for k, padded in enumerate(candidates)
                   for dy in range(3) for dx in range(3)
                   if torch.equal(out[b], padded[b, :, dy:dy + 6, dx:dx + 6])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 4  # offsets (and flips) really vary across the batch


def test_preview_shows_raw_images_or_rows():
    images = preview(DataConfig(source="builtin:digits"), seed=0)
    assert len(images["images"]) == 16 and images["images"][0].shape == (1, 8, 8)
    assert images["images"][0].min() >= 0  # raw pixels, not standardized ones
    assert set(images["image_labels"]) <= {str(i) for i in range(10)}
    assert sum(images["classes"].values()) == images["rows"]["train"]
    rows = preview(DataConfig(source="builtin:wine"), seed=0)
    assert len(rows["head"]["target"]) == 10 and "alcohol" in rows["head"]


def test_the_default_target_is_a_column_named_like_a_label(tmp_path):
    from engine.data import default_target

    assert default_target(["bill_length", "species", "island", "year"]) == "species"
    assert default_target(["a", "Label ", "b"]) == "Label "
    assert default_target(["a", "b", "c"]) == "c"  # else the last column
    rows = "\n".join(f"{i},{i % 2},{2000 + i}" for i in range(40))
    (tmp_path / "t.csv").write_text(f"x,class,year\n{rows}\n")
    _, y, _ = load_arrays(DataConfig(source=str(tmp_path / "t.csv")))
    assert sorted(set(y.tolist())) == [0, 1]  # `class`, not the last column `year`
