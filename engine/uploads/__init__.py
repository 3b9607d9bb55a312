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
- `unpack_model_folder`: a ZIP of a Hugging Face folder or a bundle, unpacked after all of
  the above, keeping only safetensors, JSON and checked graphs.

The parts: `archives` (limits, names, sizes, ZIP structure), `pickles` (pickles and
model files), `onnx_files` (ONNX external data), `folders` (model folder ZIPs).
"""

from __future__ import annotations

from pathlib import Path

from engine.settings import DEFAULT_UPLOAD_LIMIT_MB, UPLOAD_LIMIT_ENV, upload_limit_mb
from engine.uploads.archives import (
    MAX_NAME_LENGTH,
    MODEL_SUFFIXES,
    ZipLimits,
    check_size,
    check_zip,
    entry_parts,
    is_zip,
    open_zip,
    safe_name,
    stored_name,
    zip_limits,
)
from engine.uploads.folders import unpack_model_folder
from engine.uploads.onnx_files import check_onnx, onnx_tensors
from engine.uploads.pickles import (
    TENSOR_GLOBALS,
    check_model_file,
    looks_like_pickle,
    pickle_globals,
    scan_pickle,
    tensor_global,
    torchscript_global,
)

__all__ = ["DEFAULT_UPLOAD_LIMIT_MB", "MAX_NAME_LENGTH", "MODEL_SUFFIXES", "TENSOR_GLOBALS",
           "UPLOAD_LIMIT_ENV", "ZipLimits", "check_model_file",
           "check_onnx", "check_size", "check_upload", "check_zip", "entry_parts", "is_zip",
           "looks_like_pickle", "onnx_tensors", "open_zip", "pickle_globals", "safe_name",
           "scan_pickle", "store_upload", "tensor_global", "torchscript_global",
           "unpack_model_folder", "upload_limit_mb", "zip_limits"]


def store_upload(name: str, data: bytes, folder: Path) -> Path:
    """Write an upload into `folder` under its content hash and a sanitized name, after every
    check above; a refused file is never written, and nothing is unpacked or executed."""
    name = safe_name(name)
    check_upload(name, data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / stored_name(data, name)
    if not path.exists():
        path.write_bytes(data)
    return path


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
