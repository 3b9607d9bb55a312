"""Pickles and model files: every import a pickle makes is checked before torch sees it.

`scan_pickle` walks a pickle's opcodes with `pickletools` and refuses any import (GLOBAL,
STACK_GLOBAL, INST, extension codes) outside an allow-list of tensor-rebuilding functions;
`check_model_file` runs it on every pickle of a model file, whatever its extension, so that
`torch.load`, `torch.jit.load` and `torch.export.load` (which itself falls back to
`weights_only=False` and `pickle.loads` on some archive entries) only ever see pickles that
passed the scan.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from engine.errors import UserError
from engine.uploads.archives import (
    EMPTY_ZIP_MAGIC,
    MAX_NESTING,
    ZIP_MAGIC,
    Source,
    check_size,
    check_zip,
    entry_parts,
    head,
    is_zip,
    label,
    read_all,
    read_entry,
    zipfile_of,
)

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
    name = label(source, name)
    check_size(source, name)
    if is_zip(source):
        _check_model_archive(source, name, depth=0)
        if head(source, 4) == ZIP_MAGIC:
            return
    # not an archive (or one with bytes in front, which torch.load reads as a legacy file):
    # a pickle of any protocol (0 and 1 have no PROTO mark) is refused, its
    # imports named when it has any outside the allow-list; other bytes go on to the loaders
    data = read_all(source)
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
    with zipfile_of(source) as zf:
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
                if _CODE_DENY.search(read_entry(zf, info, name).decode("utf-8", "replace")):
                    raise UserError(f"{name} holds code ({entry!r}) that calls torch.from_file "
                                    f"or a non-standard operator, which could touch files on "
                                    f"the server; export the model with torch.export.save "
                                    f"from plain PyTorch layers.")
                continue
            blob = read_entry(zf, info, name)
            label = f"{name} ({entry})"
            if blob[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
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
            config = json.loads(read_entry(zf, info, name))["config"]
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


