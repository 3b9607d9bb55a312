"""Hostile and broken uploads: each is refused with one sentence, nothing runs, nothing is
written where it should not be (engine.uploads and the loaders that call it)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import stat
import tempfile
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import engine
from engine import uploads
from engine.data import load_arrays, load_data
from engine.errors import UserError
from engine.models import (
    build_model,
    check_fits,
    load_model,
    onnx_complexity,
    read_onnx,
    save_model,
)
from engine.recipe import DataConfig, ModelConfig
from engine.uploads import check_upload, check_zip, safe_name, scan_pickle

ROOT = Path(__file__).resolve().parents[1]


# --- hostile payloads ------------------------------------------------------------------------

class Shell:
    """Unpickling this runs `touch MARKER` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Exec:
    """Unpickling this creates MARKER through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def small_model() -> torch.nn.Module:
    return build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes] = {},  # noqa: B006
                ) -> None:
    """A copy of `src` with the entries ending in a key of `replace` swapped for its bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith(k)),
                        zin.read(info))
            zout.writestr(info, data)
        for name, data in add.items():
            zout.writestr(name, data)


def assert_refused(path: Path, match: str, marker: Path) -> None:
    with pytest.raises(UserError, match=match):
        build_model(ModelConfig(source=str(path), architecture="mlp", hidden=(8,)), (4,), 3,
                    seed=0)
    assert not marker.exists(), f"{path.name} ran its payload"


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text and text.endswith("."), text
    return text


# --- 1. the size cap ---------------------------------------------------------------------------

def test_the_size_cap_is_configurable_and_enforced_on_file_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_UPLOAD_LIMIT_MB", "1")
    rows = "\n".join(f"{i},{i % 2}" for i in range(200_000))
    (tmp_path / "big.csv").write_text(f"a,label\n{rows}\n")
    size_mb = (tmp_path / "big.csv").stat().st_size / 2**20
    with pytest.raises(UserError, match=rf"is {size_mb:.1f} MB, over the 1 MB upload limit") as e:
        load_arrays(DataConfig(source=str(tmp_path / "big.csv")))
    assert "WORKBENCH_UPLOAD_LIMIT_MB" in one_sentence(e)
    (tmp_path / "big.pt").write_bytes(torch_bytes({"w": torch.zeros(300_000)}))
    with pytest.raises(UserError, match="over the 1 MB upload limit"):
        load_model(ModelConfig(source=str(tmp_path / "big.pt"), architecture="mlp"), (4,), 3)
    monkeypatch.setenv("WORKBENCH_UPLOAD_LIMIT_MB", "lots")
    with pytest.raises(UserError, match="positive whole number"):
        uploads.upload_limit_mb()
    monkeypatch.delenv("WORKBENCH_UPLOAD_LIMIT_MB")
    assert uploads.upload_limit_mb() == 200


def test_the_ui_states_the_cap_the_server_enforces():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == uploads.DEFAULT_UPLOAD_LIMIT_MB
    from views import common

    effective = min(uploads.upload_limit_mb(), config["server"]["maxUploadSize"])
    assert effective == common.UPLOAD_LIMIT_MB
    assert "UPLOAD_LIMIT_MB} MB" in (ROOT / "views" / "data_model.py").read_text()


def test_save_upload_refuses_before_writing_and_sanitizes_the_name(tmp_path, monkeypatch):
    from views.common import save_upload

    folder = tmp_path / "uploads"
    upload = SimpleNamespace(name="../../etc/passwd.csv", getvalue=lambda: b"a,b\n1,2\n")
    path = save_upload(upload, folder)
    assert path.parent == folder and path.name.endswith("_passwd.csv")
    monkeypatch.setenv("WORKBENCH_UPLOAD_LIMIT_MB", "1")
    big = SimpleNamespace(name="big.csv", getvalue=lambda: bytes(2 << 20))
    with pytest.raises(UserError, match="over the 1 MB upload limit"):
        save_upload(big, folder)
    marker = tmp_path / "marker"
    for name, data in (("m.pt", torch_bytes({"x": Shell(marker)})),
                       ("m.pkl", pickle.dumps(Exec(marker))),
                       ("d.zip", zip_with("../escape.png", b"x"))):
        with pytest.raises(UserError):
            save_upload(SimpleNamespace(name=name, getvalue=lambda d=data: d), folder)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # only the good one
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uploads"]


# --- 8. names ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("data.csv", "data.csv"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system32\\evil.dll", "evil.dll"),
    ("/abs/path/model.pt2", "model.pt2"),
    (".bashrc", "bashrc"),
    ("..", "upload"),
    ("", "upload"),
    ("a b;rm -rf $(x)|y.csv", "a_b_rm_-rf_x_y.csv"),
    ("caf\u00e9 r\u00e9sum\u00e9.csv", "cafe_resume.csv"),
    ("x\x00y.pt", "x_y.pt"),
    ("model..pt", "model.pt"),
])
def test_safe_name(name, expected):
    assert safe_name(name) == expected


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_safe_name_is_always_one_harmless_component(name):
    out = safe_name(name)
    assert 1 <= len(out) <= uploads.MAX_NAME_LENGTH
    assert "/" not in out and "\\" not in out and ".." not in out
    assert not out.startswith(".") and out not in (".", "..")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in out)
    base = Path("/srv/store/uploads")
    assert (base / out).resolve().parent == base


# --- 2. pickles --------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [Shell, Exec])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".bin", ".pt2"])
def test_a_bare_hostile_pickle_is_refused_whatever_its_extension(tmp_path, payload, suffix):
    marker = tmp_path / "marker"
    for protocol in (0, 2, 4):
        path = tmp_path / f"evil{protocol}{suffix}"
        path.write_bytes(pickle.dumps(payload(marker), protocol=protocol))
        assert_refused(path, r"would import (posix\.system|(__)?builtins?(__)?\.exec)", marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"evil{p}{suffix}" for p in (0, 2, 4))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_a_zip_format_torch_file_with_a_hostile_pickle_is_refused(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(torch_bytes({"fc1.weight": torch.zeros(8, 4), "x": Shell(marker)}))
    assert_refused(path, r"evil\S* \(\S*data\.pkl\) holds a pickle that would import "
                         r"posix\.system", marker)


def test_a_plain_state_dict_still_loads_and_a_clean_bare_pickle_does_not(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(ModelConfig(source=str(tmp_path / "sd.pt"), architecture="mlp",
                                    hidden=(8,)), (4,), 3)
    x = torch.randn(3, 4)
    assert torch.allclose(loaded(x), model(x))
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match=r"bare pickle.*never loaded"):
        load_model(ModelConfig(source=str(tmp_path / "plain.pt"), architecture="mlp"), (4,), 3)


def test_a_pt2_archive_with_a_hostile_pickle_is_refused_before_torch_export_load(tmp_path):
    save_model(small_model(), (4,), tmp_path / "good.pt2")
    marker = tmp_path / "marker"
    rewrite_zip(tmp_path / "good.pt2", tmp_path / "evil.pt2",
                {"data/sample_inputs/model.pt": torch_bytes({"x": Shell(marker)})})
    assert_refused(tmp_path / "evil.pt2", r"evil\.pt2 \(\S*sample_inputs/model\.pt\) \(\S*"
                                          r"data\.pkl\) holds a pickle that would import "
                                          r"posix\.system", marker)
    # the threat is real: torch.export.load itself falls back to weights_only=False here
    with contextlib.suppress(Exception):
        torch.export.load(str(tmp_path / "evil.pt2"))
    assert marker.exists(), "the control no longer executes; torch closed the hole"


def test_a_pt2_archive_with_pickled_or_compiled_payloads_is_refused(tmp_path):
    save_model(small_model(), (4,), tmp_path / "good.pt2")
    assert build_model(ModelConfig(source=str(tmp_path / "good.pt2")), (4,), 3, seed=0)
    marker = tmp_path / "marker"
    with zipfile.ZipFile(tmp_path / "good.pt2") as zf:
        root = zf.namelist()[0].split("/")[0]
        config_name = next(n for n in zf.namelist() if n.endswith("model_constants_config.json"))
    opaque = (b'{"config": {"c": {"path_name": "opaque_obj_0", "is_param": false, '
              b'"use_pickle": true, "tensor_meta": null}}}')
    rewrite_zip(tmp_path / "good.pt2", tmp_path / "opaque.pt2", {config_name: opaque},
                {f"{root}/data/constants/opaque_obj_0": pickle.dumps(Exec(marker))})
    assert_refused(tmp_path / "opaque.pt2", r"opaque_obj_0\) holds a pickle that would import "
                                            r"builtins\.exec", marker)
    rewrite_zip(tmp_path / "good.pt2", tmp_path / "aoti.pt2", {},
                {f"{root}/data/aotinductor/model/model.so": b"\x7fELF"})
    assert_refused(tmp_path / "aoti.pt2", "compiled code", marker)


def test_torchscript_pickles_and_code_pass_the_same_scan(tmp_path):
    torch.jit.save(torch.jit.script(small_model()), tmp_path / "ts.pt")
    assert build_model(ModelConfig(source=str(tmp_path / "ts.pt")), (4,), 3, seed=0)
    marker = tmp_path / "marker"
    rewrite_zip(tmp_path / "ts.pt", tmp_path / "evil_ts.pt",
                {"/data.pkl": pickle.dumps(Shell(marker), protocol=2)})
    assert_refused(tmp_path / "evil_ts.pt", r"data\.pkl\) holds a pickle that would import "
                                            r"posix\.system", marker)
    with zipfile.ZipFile(tmp_path / "ts.pt") as zf:
        code = next(n for n in zf.namelist() if n.endswith("container.py"))
        text = zf.read(code).decode()
    rewrite_zip(tmp_path / "ts.pt", tmp_path / "file_ts.pt",
                {code: text.replace("return", "_0 = torch.from_file('/etc/passwd')\n    return",
                                    1).encode()})
    assert_refused(tmp_path / "file_ts.pt", "torch.from_file", marker)


def test_the_scan_reads_stack_global_and_memoized_names():
    assert list(uploads.pickle_globals(pickle.dumps(Shell(Path("m")), protocol=4))) == [
        f"{os.system.__module__}.system"]
    # a name fetched back from the memo is still seen
    forged = (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94h\x00h\x01\x93\x8c\x04true\x85R.")
    assert list(uploads.pickle_globals(forged)) == ["posix.system"]
    with pytest.raises(UserError, match=r"would import posix\.system"):
        scan_pickle(forged, "forged.pkl")
    computed = b"\x80\x04\x8c\x05posix\x8c\x03sys\x8c\x03tem\x86\x93."  # not plain strings
    with pytest.raises(UserError, match="damaged or forged"):
        scan_pickle(computed, "computed.pkl")
    with pytest.raises(UserError, match="damaged or forged"):
        scan_pickle(b"\x80\x02\x82\x01.", "ext.pkl")  # EXT1: the copyreg extension registry


# --- 3. ZIP archives -----------------------------------------------------------------------------

def zip_with(name: str, data: bytes, *, attr: int | None = None, flags: int = 0,
             compress: int = zipfile.ZIP_STORED) -> bytes:
    """A ZIP of two good class folders plus one entry `name` as asked."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cats/0.png", png())
        zf.writestr("dogs/0.png", png())
        info = zipfile.ZipInfo(name)
        info.compress_type = compress
        if attr is not None:
            info.external_attr = attr << 16
        zf.writestr(info, data)
    out = bytearray(buf.getvalue())
    if flags:  # zipfile cannot write these bits: set them in the central directory
        at = out.rindex(b"PK\x01\x02")  # the last entry's directory record
        out[at + 8] |= flags
    return bytes(out)


def png(size: int = 6) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(size).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("entry", "attr", "flags", "match"), [
    ("../escape.png", None, 0, r"unsafe entry '\.\./escape\.png'"),
    ("cats/../../escape.png", None, 0, "unsafe entry"),
    ("/etc/escape.png", None, 0, "unsafe entry '/etc/escape.png'"),
    ("C:/escape.png", None, 0, "unsafe entry"),
    ("..\\escape.png", None, 0, "unsafe entry"),
    ("cats/link.png", stat.S_IFLNK | 0o777, 0, "symbolic link 'cats/link.png'"),
    ("cats/secret.png", None, 0x1, "encrypted entry"),
])
def test_unsafe_zip_entries_are_refused_before_anything_is_read(tmp_path, entry, attr, flags,
                                                                 match):
    data = zip_with(entry, b"/etc/passwd", attr=attr, flags=flags)
    for suffix, load in ((".zip", lambda p: load_arrays(DataConfig(source=str(p)))),
                         (".pt", lambda p: load_model(ModelConfig(source=str(p)), (4,), 3))):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(data)
        with pytest.raises(UserError, match=match) as e:
            load(path)
        one_sentence(e)
        with pytest.raises(UserError, match=match):
            check_upload(f"bad{suffix}", data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "bad.zip"]
    assert not (tmp_path.parent / "escape.png").exists()


def test_zip_bombs_and_oversized_archives_are_refused_from_the_directory(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="Duplicate"):
        dup = zip_with("cats/0.png", png())
    with pytest.raises(UserError, match=r"holds 'cats/0\.png' twice"):
        check_zip(dup, "dup.zip")
    bomb = zip_with("cats/bomb.png", bytes(20 << 20),  # 20 MB of zeros deflate to ~20 KB
                    compress=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 100_000
    with pytest.raises(UserError, match=r"unpacks to 20\.0 MB from 0\.0 MB, a ratio over 200"):
        check_zip(bomb, "bomb.zip")
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_RATIO", "100000")
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_MB", "10")
    with pytest.raises(UserError, match=r"unpacks to 20\.0 MB, more than the 10\.0 MB"):
        check_zip(bomb, "bomb.zip")
    monkeypatch.setenv("WORKBENCH_ZIP_MAX_ENTRIES", "2")
    with pytest.raises(UserError, match="3 entries, more than the 2 allowed"):
        check_zip(bomb, "bomb.zip")
    (tmp_path / "b.zip").write_bytes(bomb)
    with pytest.raises(UserError, match="entries"):
        load_arrays(DataConfig(source=str(tmp_path / "b.zip")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zip"]


# --- 4. ONNX external data -----------------------------------------------------------------------

def onnx_model(folder: Path, location: str | None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "48")):
            w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                              [w])
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin",
                                      "link.bin"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, location):
    folder = tmp_path / "models"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full((4, 3), 7, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)  # inside by name, outside in fact
    path = onnx_model(folder, location)
    for load in (onnx_complexity, read_onnx):
        with pytest.raises(UserError, match="outside the model's own folder") as e:
            load(path)
        one_sentence(e)
    with pytest.raises(UserError, match="outside the model's own folder"):
        engine.run({"data": {"source": "builtin:iris"}, "model": {"source": str(path)}},
                   out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_onnx_external_data_inside_its_folder_is_folded_in(tmp_path):
    import onnxruntime as ort

    (tmp_path / "w.bin").write_bytes(np.full((4, 3), 2, np.float32).tobytes())
    path = onnx_model(tmp_path, "w.bin")
    blob = read_onnx(path)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.ones((1, 4), np.float32)})[0]
    assert np.allclose(out, 8.0)
    with pytest.raises(UserError, match="cannot bring along"):  # an upload comes on its own
        check_upload("m.onnx", path.read_bytes())
    check_upload("m.onnx", onnx_model(tmp_path, None).read_bytes())


# --- 5. images that are not images ---------------------------------------------------------------

@pytest.mark.parametrize(("entry", "data"), [
    ("dogs/text.png", b"this is text, not a PNG"),
    ("dogs/cut.png", png(64)[:2000]),
    ("dogs/empty.jpg", b""),
])
def test_images_that_are_not_images_are_refused_by_name(tmp_path, entry, data):
    (tmp_path / "imgs.zip").write_bytes(zip_with(entry, data))
    with pytest.raises(UserError, match=rf"'{entry}' in 'imgs\.zip' is not an image") as e:
        load_arrays(DataConfig(source=str(tmp_path / "imgs.zip")))
    one_sentence(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs.zip"]


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    from engine.data import loaders

    monkeypatch.setattr(loaders, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "imgs.zip").write_bytes(zip_with("dogs/big.png", png(32)))
    with pytest.raises(UserError, match=r"'dogs/big\.png' in 'imgs\.zip' is 32x32 pixels, "
                                        r"more than the 100 allowed"):
        load_arrays(DataConfig(source=str(tmp_path / "imgs.zip")))


# --- 6. tables -------------------------------------------------------------------------------

def table(n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                         "label": rng.choice(["cat", "dog"], n)})


def test_nan_and_infinite_values_are_counted_and_cleaned_only_on_request(tmp_path):
    df = table()
    df.loc[:7, "a"] = np.nan
    df.loc[100:103, "b"] = np.inf
    df.to_csv(tmp_path / "t.csv", index=False)
    src = str(tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"12 of 500 rows of 't\.csv' have missing or infinite "
                                        r"values \(columns: a, b\); set data\.missing") as e:
        load_arrays(DataConfig(source=src))
    one_sentence(e)
    assert load_arrays(DataConfig(source=src, missing="drop"))[0].shape == (488, 2)
    assert load_arrays(DataConfig(source=src, missing="median"))[0].shape == (500, 2)


def test_mixed_types_in_a_feature_column_are_refused_or_treated_as_missing(tmp_path):
    df = table().astype({"a": object})
    df.loc[[3, 9, 27], "a"] = ["n/a", "12,5", "?"]
    df.to_csv(tmp_path / "t.csv", index=False)
    src = str(tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"column 'a' of 't\.csv' mixes numbers and text: 2 of "
                                        r"500 rows hold text such as '12,5'") as e:
        load_arrays(DataConfig(source=src))  # "n/a" is read as missing by pandas itself
    assert 'data.missing to "drop"' in one_sentence(e)
    X, _, meta = load_arrays(DataConfig(source=src, missing="drop"))
    assert X.shape == (497, 2) and meta["feature_names"] == ["a", "b"]  # not one-hot encoded
    X, _, _ = load_arrays(DataConfig(source=src, missing="mean"))
    assert X.shape == (500, 2) and np.isfinite(X).all()
    colours = table().assign(colour=np.where(np.arange(500) % 2, "red", "7"))
    colours.to_csv(tmp_path / "c.csv", index=False)  # half numbers is still a category column
    assert load_arrays(DataConfig(source=str(tmp_path / "c.csv"), target="label"))[0].shape[1] == 4


def test_target_problems_name_the_column_or_the_rows(tmp_path):
    table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"target column 'species' is not in 't\.csv'; set "
                                        r"data\.target to one of: a, b, label"):
        load_arrays(DataConfig(source=str(tmp_path / "t.csv"), target="species"))
    table().assign(label="cat").to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(UserError, match=r"single class \(cat in all 500 rows\)"):
        load_data(DataConfig(source=str(tmp_path / "one.csv")), seed=0)
    table().assign(label=2.5).to_csv(tmp_path / "const.csv", index=False)
    with pytest.raises(UserError, match=r"constant \(all 500 rows are 2\.5\)"):
        load_data(DataConfig(source=str(tmp_path / "const.csv"), task="regression"), seed=0)


def npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": array.dtype.str, "fortran_order": False,
                                               "shape": shape or array.shape})
    return buf.getvalue() + array.tobytes()


def test_npz_headers_that_claim_more_than_they_hold_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "f.npz", "w") as zf:
        zf.writestr("X.npy", npy(np.zeros((4, 2), np.float32), (9999999999, 2)))
        zf.writestr("y.npy", npy(np.zeros(4)))
    with pytest.raises(UserError, match=r"X\.npy in 'f\.npz' declares shape \(9999999999, 2\)"):
        load_arrays(DataConfig(source=str(tmp_path / "f.npz")))


# --- mismatches ------------------------------------------------------------------------------

def test_a_model_that_does_not_fit_names_both_shapes_and_what_to_change(tmp_path):
    model = small_model()
    save_model(model, (4,), tmp_path / "m.pt2")
    graph = build_model(ModelConfig(source=str(tmp_path / "m.pt2")), (4,), 3, seed=0)
    for candidate, takes in ((model, "4 features"), (graph, "4 features")):
        with pytest.raises(UserError, match=rf"takes samples of {takes} but this dataset's "
                                            rf"samples have shape \(13,\).*a model built for "
                                            rf"samples of shape \(13,\)") as e:
            check_fits(candidate, (13,), 3)
        one_sentence(e)
        with pytest.raises(UserError, match=r"outputs of shape \(3,\).*needs \(2,\); change "
                                            r"the model's output layer to 2 outputs"):
            check_fits(candidate, (4,), 2)


def test_good_files_pass_every_check():
    for suffix, data in VALID.items():
        check_upload(f"good{suffix}", data)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(small_model()), buf)
    check_upload("script.pt", buf.getvalue())


# --- 7. fuzzing ------------------------------------------------------------------------------

def _valid_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    files[".csv"] = table(40).to_csv(index=False).encode()
    buf = io.BytesIO()
    np.savez(buf, X=np.random.default_rng(0).normal(size=(20, 3)), y=np.arange(20) % 2)
    files[".npz"] = buf.getvalue()
    files[".zip"] = zip_with("dogs/1.png", png())
    files[".pt"] = torch_bytes(small_model().state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        save_model(small_model(), (4,), Path(tmp) / "m.pt2")
        files[".pt2"] = (Path(tmp) / "m.pt2").read_bytes()
        files[".onnx"] = onnx_model(Path(tmp), None).read_bytes()
    return files


VALID = _valid_files()


def _load(suffix: str, path: Path) -> None:
    if suffix in (".csv", ".npz", ".zip"):
        load_data(DataConfig(source=str(path)), seed=0)
    elif suffix == ".onnx":
        onnx_complexity(path)
        read_onnx(path)
    else:
        load_model(ModelConfig(source=str(path), architecture="mlp", hidden=(8,)), (4,), 3)


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix])
    how = draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "random":
        data = bytearray(draw(st.binary(max_size=2000)))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    return suffix, bytes(data)


@given(mutated())
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_fuzzed_files_only_ever_raise_user_errors_and_write_nothing(case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        path = folder / f"f{suffix}"
        path.write_bytes(data)
        before = set(Path(tmp).rglob("*"))
        cwd = set(Path.cwd().iterdir())
        for run in (lambda: _load(suffix, path), lambda: check_upload(f"f{suffix}", data)):
            try:
                run()
            except UserError as exc:
                assert "\n" not in str(exc), str(exc)
        assert set(Path(tmp).rglob("*")) == before
        assert set(Path.cwd().iterdir()) == cwd


@given(st.binary(max_size=400))
@settings(max_examples=100, deadline=None, derandomize=True)
def test_the_pickle_scan_only_ever_raises_user_errors(data):
    try:
        scan_pickle(data, "f.pkl")
    except UserError as exc:
        assert "\n" not in str(exc)


# --- the page ------------------------------------------------------------------------------

def test_the_page_shows_a_refused_upload_as_one_sentence_and_stores_nothing(tmp_path,
                                                                            monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_STORE", f"sqlite:///{tmp_path}/store.db")
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "artifacts"))
    marker = tmp_path / "marker"
    at = AppTest.from_file("../app.py", default_timeout=90)
    at.run()
    at.switch_page("views/data_model.py").run()
    at.radio(key="dm_model_kind").set_value("Upload").run()
    at.file_uploader(key="dm_model_file").upload("m.pt", torch_bytes({"x": Shell(marker)})).run()
    assert not at.exception
    assert any("would import posix.system" in e.value for e in at.error)
    assert at.session_state["selection"]["model"]["source"].startswith("builtin:")
    at.radio(key="dm_data_kind").set_value("Upload").run()
    at.file_uploader(key="dm_data_file").upload("d.zip", zip_with("../up.png", png())).run()
    assert not at.exception
    assert any("unsafe entry '../up.png'" in e.value for e in at.error)
    assert at.session_state["selection"]["data"]["source"].startswith("builtin:")
    uploads_dir = tmp_path / "uploads"
    assert not uploads_dir.exists() or not any(uploads_dir.iterdir())
    assert not marker.exists() and not (tmp_path / "up.png").exists()


def test_an_upload_is_named_on_the_pages_as_it_was_uploaded_not_by_its_hash(tmp_path):
    """A stored upload carries its content's hash in its name; every page names it by
    short_source, which gives the name the person uploaded (the issue saw 'model-d8edcd91a5c6')."""
    from engine.recipe import short_source
    from engine.uploads import store_upload, unpack_model_folder

    csv = store_upload("penguins.csv", b"a,b,label\n1,2,x\n3,4,y\n", tmp_path)
    assert csv.name != "penguins.csv" and short_source(str(csv)) == "penguins.csv"
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        zf.writestr("bert/config.json", '{"model_type": "bert"}')
        zf.writestr("bert/model.safetensors", b"not read here")
    archive = store_upload("my bert.zip", blob.getvalue(), tmp_path)
    source = unpack_model_folder(archive, tmp_path)
    assert source.startswith("hf:") and short_source(source) == "my_bert"
    assert short_source(str(Path(source[3:]) / "model.onnx")) == "my_bert"
    assert short_source("builtin:digits") == "digits"
