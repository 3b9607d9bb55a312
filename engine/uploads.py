"""Checks on uploaded files, run before anything is stored, unpacked, unpickled or loaded.

Every check reads the file as inert bytes and ends in a `UserError` with one sentence naming
the file, what is wrong and what to do. Nothing here unpickles, extracts or executes anything:

- `safe_name`: an uploaded file name reduced to a harmless single path component.
- `check_upload`: what the app runs on an upload before writing it (size cap, archive
  structure, pickles, ONNX external data).
- `check_size`, `check_zip`: the size cap and the ZIP checks (path traversal, absolute paths,
  links, encryption, entry count, uncompressed size, compression ratio) shared by data and
  model loaders.
- `scan_pickle`: walks a pickle's opcodes with `pickletools` and refuses any import (GLOBAL,
  STACK_GLOBAL, INST, extension codes) outside an allow-list of tensor-rebuilding functions.
- `check_model_file`: all of the above for a model file, whatever its extension, so that
  `torch.load`, `torch.jit.load` and `torch.export.load` (which itself falls back to
  `weights_only=False` and `pickle.loads` on some archive entries) only ever see pickles
  that passed the scan.
- `check_onnx`: ONNX tensors whose external data lies outside the model's own folder.

The limits come from environment variables, read at each call: WORKBENCH_UPLOAD_LIMIT_MB
(200, also Streamlit's server.maxUploadSize), WORKBENCH_ZIP_MAX_ENTRIES (50,000),
WORKBENCH_ZIP_MAX_MB (1,024, uncompressed) and WORKBENCH_ZIP_MAX_RATIO (200).
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import stat
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from engine.errors import UserError
from engine.settings import env_int

Source = bytes | str | Path

UPLOAD_LIMIT_ENV = "WORKBENCH_UPLOAD_LIMIT_MB"
ZIP_ENTRIES_ENV = "WORKBENCH_ZIP_MAX_ENTRIES"
ZIP_MB_ENV = "WORKBENCH_ZIP_MAX_MB"
ZIP_RATIO_ENV = "WORKBENCH_ZIP_MAX_RATIO"
DEFAULT_UPLOAD_LIMIT_MB = 200
DEFAULT_ZIP_ENTRIES = 50_000
DEFAULT_ZIP_MB = 1024
DEFAULT_ZIP_RATIO = 200
RATIO_FLOOR = 1 << 20  # entries smaller than this unpacked are never called bombs
MAX_NAME_LENGTH = 100
MAX_NESTING = 2  # a torch.save archive inside a .pt2 archive, no deeper

MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".pkl", ".pickle", ".bin", ".ckpt", ".jit")
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"


# --- limits --------------------------------------------------------------------------------

def upload_limit_mb() -> int:
    """The largest file accepted, in MiB (WORKBENCH_UPLOAD_LIMIT_MB, default 200)."""
    return env_int(UPLOAD_LIMIT_ENV, DEFAULT_UPLOAD_LIMIT_MB)


@dataclass(frozen=True)
class ZipLimits:
    entries: int
    total_bytes: int
    ratio: int


def zip_limits() -> ZipLimits:
    """Entry count, summed uncompressed size and per-entry compression ratio allowed."""
    return ZipLimits(env_int(ZIP_ENTRIES_ENV, DEFAULT_ZIP_ENTRIES),
                     env_int(ZIP_MB_ENV, DEFAULT_ZIP_MB) << 20,
                     env_int(ZIP_RATIO_ENV, DEFAULT_ZIP_RATIO))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


# --- names ---------------------------------------------------------------------------------

def safe_name(name: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file name that is one harmless path component: the last component of `name`, letters,
    digits, '.', '-' and '_' only, no leading dot, at most `max_length` characters, keeping
    the extension; "upload" when nothing usable is left."""
    name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    name = re.split(r"[/\\]", name)[-1]  # a browser may send a whole path
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    name = re.sub(r"\.{2,}", ".", name).lstrip("._-")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    ext = ext[:16]
    stem = stem[:max(1, max_length - len(ext) - 1)].rstrip("._-") or "upload"
    return f"{stem}.{ext}" if ext else stem


# --- size ----------------------------------------------------------------------------------

def _size(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else Path(source).stat().st_size


def _read(source: Source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _head(source: Source, n: int = 8) -> bytes:
    if isinstance(source, bytes):
        return source[:n]
    with open(source, "rb") as fh:
        return fh.read(n)


def _label(source: Source, name: str | None) -> str:
    return name or (Path(source).name if not isinstance(source, bytes) else "the file")


def _open(source: Source) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def check_size(source: Source, name: str) -> None:
    """Refuse a file over the upload cap, naming its size and the cap."""
    size, limit = _size(source), upload_limit_mb()
    if size > limit << 20:
        raise UserError(f"{name} is {_mb(size)}, over the {limit} MB upload limit; upload a "
                        f"smaller file or raise {UPLOAD_LIMIT_ENV}.")


# --- ZIP archives --------------------------------------------------------------------------

def is_zip(source: Source) -> bool:
    """A ZIP by its first bytes or, as ZIP readers (PyTorch's miniz included) find archives
    from the end, by an end-of-directory record with junk in front."""
    if _head(source, 4) in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
        return True
    with _open(source) as fh:
        return zipfile.is_zipfile(fh)


def _zipfile(source: Source) -> zipfile.ZipFile:
    """A path is opened (and closed) by ZipFile itself; bytes are read from memory."""
    return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)


def open_zip(source: Source, name: str, what: str = "ZIP archive") -> zipfile.ZipFile:
    """A `ZipFile` on an archive that passed `check_zip`; close it after use."""
    check_zip(source, name, what)
    return _zipfile(source)


def entry_parts(filename: str) -> tuple[str, ...]:
    """An entry's path components, with backslashes read as separators."""
    return PurePosixPath(filename.replace("\\", "/")).parts


def check_zip(source: Source, name: str, what: str = "ZIP archive") -> None:
    """Structure and limits of a ZIP archive, from its directory alone (nothing is read)."""
    limits = zip_limits()
    try:
        with _zipfile(source) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError, IndexError, KeyError, OverflowError):
        raise UserError(f"{name} is not a valid {what}; create it again.") from None
    if len(infos) > limits.entries:
        raise UserError(f"{name} has {len(infos):,} entries, more than the {limits.entries:,} "
                        f"allowed ({ZIP_ENTRIES_ENV}); use fewer files.")
    total, seen = 0, set()
    for info in infos:
        entry = info.filename
        parts = entry_parts(entry)
        if ("\x00" in entry or entry.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", entry)
                or ".." in parts):
            raise UserError(f"{name} holds an unsafe entry {entry!r} (an absolute path or "
                            f"'..'); create the archive again from relative paths.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UserError(f"{name} holds a symbolic link {entry!r}, which is never "
                            f"followed; archive the files themselves instead of links.")
        if info.flag_bits & 0x1:
            raise UserError(f"{name} holds an encrypted entry {entry!r}; create the archive "
                            f"again without a password.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                      zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            raise UserError(f"{name} uses an unsupported compression method for {entry!r}; "
                            f"create it again with ordinary (deflate) compression.")
        if entry in seen:
            raise UserError(f"{name} holds {entry!r} twice; create the archive again.")
        seen.add(entry)
        if (info.file_size > RATIO_FLOOR
                and info.file_size > limits.ratio * max(info.compress_size, 1)):
            raise UserError(f"{name}: {entry!r} unpacks to {_mb(info.file_size)} from "
                            f"{_mb(info.compress_size)}, a ratio over {limits.ratio} that marks "
                            f"a zip bomb; create the archive again ({ZIP_RATIO_ENV}).")
        total += info.file_size
    if total > limits.total_bytes:
        raise UserError(f"{name} unpacks to {_mb(total)}, more than the "
                        f"{_mb(limits.total_bytes)} allowed ({ZIP_MB_ENV}); use smaller or "
                        f"fewer files.")


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    try:
        return zf.read(info)
    except Exception:  # any failure to decompress hostile bytes is the file's
        raise UserError(f"{name}: the entry {info.filename!r} cannot be read (a damaged or "
                        f"forged archive); create it again.") from None


# --- pickles -------------------------------------------------------------------------------

_TORCH_DTYPES = ("float", "double", "half", "bfloat16", "float16", "float32", "float64",
                 "int", "long", "short", "int8", "int16", "int32", "int64", "uint8", "bool",
                 "complex64", "complex128", "cfloat", "cdouble", "uint16", "uint32", "uint64",
                 "float8_e4m3fn", "float8_e5m2")
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
             "Bool", "ComplexFloat", "ComplexDouble", "Untyped")

TENSOR_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor", "torch.nn.parameter.Parameter", "torch.Size", "torch.device",
    "torch.storage.UntypedStorage", "_codecs.encode",
    *(f"torch.{s}Storage" for s in _STORAGES), *(f"torch.{d}" for d in _TORCH_DTYPES),
})
"""What a `torch.save` of a state_dict of tensors imports (a subset of what
`torch.load(weights_only=True)` allows): containers, tensor rebuilders, storages, dtypes."""

_TORCHSCRIPT_FUNCTIONS = frozenset(
    f"torch.jit._pickle.{f}" for f in ("build_intlist", "build_tensorlist", "build_doublelist",
                                       "build_boollist", "build_tensor_from_id",
                                       "restore_type_tag"))


def tensor_global(ref: str) -> bool:
    return ref in TENSOR_GLOBALS


def torchscript_global(ref: str) -> bool:
    """TorchScript pickles also name classes compiled from the archive's own code
    (`__torch__.*`, resolved by the TorchScript runtime, never imported) and list builders."""
    return ref in TENSOR_GLOBALS or ref in _TORCHSCRIPT_FUNCTIONS or ref.startswith("__torch__.")


_MARK = object()
_UNKNOWN = object()
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8"}


def pickle_globals(data: bytes) -> Iterator[str]:
    """Every `module.name` a pickle would import, found without unpickling: the opcodes are
    walked with `pickletools.genops` and the stack simulated far enough to know the strings
    that STACK_GLOBAL takes. Raises ValueError for anything that is not a well-formed pickle
    or whose imports cannot be known (extension codes, computed names)."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    stopped = False
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("GLOBAL", "INST"):
            module, _, qualname = str(arg).partition(" ")
            yield f"{module}.{qualname}"
        elif op.name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(v, str) for v in stack[-2:]):
                raise ValueError("STACK_GLOBAL on names that are not plain strings")
            yield f"{stack[-2]}.{stack[-1]}"
        elif op.name in ("EXT1", "EXT2", "EXT4"):
            raise ValueError("extension-registry imports cannot be checked")
        before, after = op.stack_before, list(op.stack_after)
        numtopop = len(before)
        if pickletools.markobject in before or (op.name == "POP" and stack
                                                and stack[-1] is _MARK):
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if not stack:
                raise ValueError("no MARK on the stack")
            stack.pop()
            numtopop = (before.index(pickletools.markobject)
                        if pickletools.markobject in before else 0)
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise ValueError("memoizing from an empty stack")
            memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = stack[-1]
            continue  # the memo ops only look at the top of the stack
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in memo:
                raise ValueError("memo key never stored")
            stack.append(memo[int(arg)])
            continue
        if numtopop:
            if len(stack) < numtopop:
                raise ValueError("stack underflow")
            del stack[-numtopop:]
        if op.name in _STRING_OPS:
            value = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            stack.append(value)
        else:
            stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN
                         for item in after)
        if op.name == "STOP":
            stopped = True
    if not stopped:
        raise ValueError("no STOP opcode")


def scan_pickle(data: bytes, name: str,
                allowed: Callable[[str], bool] = tensor_global) -> None:
    """Refuse a pickle that imports anything outside `allowed`, before it is ever unpickled."""
    try:
        for ref in pickle_globals(data):
            if not allowed(ref):
                raise UserError(f"{name} holds a pickle that would import {ref}, so it is never "
                                f"loaded; save only tensors (torch.save(model.state_dict(), "
                                f"path)) or export the model with torch.export.save.")
    except UserError:
        raise
    except Exception:  # pickletools' way of saying "malformed" varies by opcode
        raise UserError(f"{name} holds a damaged or forged pickle, which is never loaded; save "
                        f"the model again with torch.save or torch.export.save.") from None


def looks_like_pickle(head: bytes) -> bool:
    """A protocol 2-5 pickle starts with PROTO n; older ones are not produced by torch."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# --- model files ---------------------------------------------------------------------------

_CODE_DENY = re.compile(
    r"\bfrom_file\b|torch\.ops\.(?!(aten|prim|prims|quantized|higher_order)\b)\w+")
_RAW_STORAGE = re.compile(r"(^|/)data/\d+$")
_PICKLE_NAMES = (".pkl", ".debug_pkl", ".pickle")
_NESTED_NAMES = (".pt", ".pth", ".bin")
_BINARY_CODE = (".so", ".dll", ".dylib", ".pyd", ".exe", ".cubin", ".o")


def check_model_file(source: Source, name: str | None = None) -> None:
    """Everything a model file must pass before PyTorch or ONNX sees it, whatever its
    extension: the size cap, no bare pickle, and for archives the ZIP checks and a scan of
    every pickle inside (and of TorchScript code and torch.export graphs for file access)."""
    name = _label(source, name)
    check_size(source, name)
    if is_zip(source):
        _check_model_archive(source, name, depth=0)
        if _head(source, 4) == _ZIP_MAGIC:
            return
    # not an archive (or one with bytes in front, which torch.load reads as a legacy file):
    # a pickle of any protocol (0 and 1 have no PROTO mark) is refused, its
    # imports named when it has any outside the allow-list; other bytes go on to the loaders
    data = _read(source)
    try:
        for ref in pickle_globals(data):
            if not tensor_global(ref):
                scan_pickle(data, name)  # raises, naming `ref`
        is_pickle = True
    except UserError:  # before ValueError, its base class
        raise
    except Exception:  # genops on arbitrary bytes: not a pickle
        is_pickle = looks_like_pickle(data[:2])
    if is_pickle:
        raise UserError(f"{name} is a bare pickle or a legacy torch.save file, which is never "
                        f"loaded; save a state_dict with torch.save in PyTorch 1.6 or later, "
                        f"or export the model with torch.export.save.")


def _check_model_archive(source: Source, name: str, *, depth: int) -> None:
    check_zip(source, name, "model archive")
    with _zipfile(source) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        torchscript = (any("/code/" in f"/{n}" for n in names)
                       and any(n.endswith("constants.pkl") for n in names))
        allowed = torchscript_global if torchscript else tensor_global
        raw, pickled = _pt2_payloads(zf, infos, name)
        for info in infos:
            entry = info.filename
            lower = entry.lower()
            if lower.endswith(_BINARY_CODE) or "/aotinductor/" in f"/{lower}":
                raise UserError(f"{name} holds compiled code ({entry!r}), which is never "
                                f"loaded; export the model with torch.export.save without "
                                f"AOTInductor.")
            if _RAW_STORAGE.search(entry) or (entry in raw and entry not in pickled):
                continue  # tensor bytes, read as raw memory and never unpickled
            if lower.endswith((".py", ".json")):
                if _CODE_DENY.search(_read_entry(zf, info, name).decode("utf-8", "replace")):
                    raise UserError(f"{name} holds code ({entry!r}) that calls torch.from_file "
                                    f"or a non-standard operator, which could touch files on "
                                    f"the server; export the model with torch.export.save "
                                    f"from plain PyTorch layers.")
                continue
            blob = _read_entry(zf, info, name)
            label = f"{name} ({entry})"
            if blob[:4] in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
                if depth >= MAX_NESTING:
                    raise UserError(f"{name} nests archives too deeply at {entry!r}; save the "
                                    f"model again with torch.save or torch.export.save.")
                _check_model_archive(blob, label, depth=depth + 1)
            elif (entry in pickled or lower.endswith(_PICKLE_NAMES)
                  or looks_like_pickle(blob[:2])):
                scan_pickle(blob, label, allowed)
            elif lower.endswith(_NESTED_NAMES):
                raise UserError(f"{label} is neither a tensor archive nor a pickle that can be "
                                f"checked, so it is never loaded; save the model again.")


def _pt2_payloads(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo],
                  name: str) -> tuple[set[str], set[str]]:
    """Entries a torch.export archive reads as raw tensor bytes, and those it unpickles, from
    its payload configs (data/weights/*_config.json, data/constants/*_config.json)."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for info in infos:
        parts = entry_parts(info.filename)
        if not (info.filename.endswith("_config.json") and len(parts) >= 3
                and parts[-3] == "data" and parts[-2] in ("weights", "constants")):
            continue
        folder = "/".join(parts[:-1])
        try:
            config = json.loads(_read_entry(zf, info, name))["config"]
            items = [(str(v["path_name"]), bool(v.get("use_pickle")))
                     for v in config.values()]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{name} has a damaged payload list ({info.filename!r}); export "
                            f"the model again with torch.export.save.") from None
        for path_name, use_pickle in items:
            entry = f"{folder}/{path_name}"
            opaque = path_name.startswith(("custom_obj_", "opaque_obj_"))
            (pickled if use_pickle or opaque else raw).add(entry)
    return raw, pickled


# --- ONNX ----------------------------------------------------------------------------------

def onnx_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse ones, node attributes, subgraphs
    and functions."""
    def graph_tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from nodes_tensors(graph.node)

    def nodes_tensors(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(proto.graph)
    for function in proto.functions:
        yield from nodes_tensors(function.node)


def check_onnx(source: Source, name: str | None = None, *,
               allow_external: bool = True) -> None:
    """Refuse an ONNX model that cannot be parsed, or whose external-data `location` is
    absolute, climbs out with '..', or resolves (through links) outside the model's folder.
    `allow_external=False` (an upload on its own) refuses external data altogether."""
    import onnx

    name = _label(source, name)
    check_size(source, name)
    try:
        proto = onnx.load_model_from_string(_read(source))
        tensors = list(onnx_tensors(proto))
    except Exception:  # protobuf's parse errors have no common base class
        raise UserError(f"{name} is not a readable ONNX model; export it again with "
                        f"torch.onnx.export.") from None
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not allow_external or isinstance(source, bytes):
            raise UserError(f"{name} keeps tensor {tensor.name!r} in an external file "
                            f"({location!r}), which an upload cannot bring along; save the "
                            f"model with its weights inside (onnx.save without "
                            f"save_as_external_data).")
        folder = Path(source).resolve().parent
        parts = entry_parts(location)
        target = (folder / location).resolve()
        if (not location or "\x00" in location or location.startswith(("/", "\\"))
                or re.match(r"[A-Za-z]:", location) or ".." in parts
                or not target.is_relative_to(folder)):
            raise UserError(f"{name} keeps tensor {tensor.name!r} in {location!r}, outside "
                            f"the model's own folder, which is never read; save the model "
                            f"with its weights inside or next to it.")


# --- the upload as a whole -------------------------------------------------------------------

def check_upload(name: str, data: bytes) -> None:
    """What an upload must pass before it is written: the size cap, then by content (not by
    extension) bare pickles, model archives, ZIP structure and ONNX external data."""
    check_size(data, name)
    suffix = Path(name).suffix.lower()
    if suffix == ".onnx":
        check_onnx(data, name, allow_external=False)
    elif looks_like_pickle(data[:2]) or suffix in MODEL_SUFFIXES:
        check_model_file(data, name)
    elif is_zip(data):
        check_zip(data, name)
