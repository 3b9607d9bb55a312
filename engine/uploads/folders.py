"""A model folder uploaded as a ZIP: a Hugging Face folder or a workbench bundle.

The ZIP passes `check_zip` (paths, links, sizes, ratios) when it is stored; unpacking then
keeps only the files such a folder holds (JSON, safetensors, an exported `.pt2` graph, the
bundle's encoding and ONNX exports, a tokenizer's text files), refuses pickled weights
(`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`: never loaded here) in one sentence, runs every
`.pt2` through the pickle checks, and writes the files, and those of one level of
subfolders (a sentence-transformers folder's 1_Pooling/, a bundle's tokenizer/), into a
folder named after the archive's hash. Nothing is executed.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from engine.errors import UserError
from engine.uploads.archives import entry_parts, open_zip, read_entry, stored_name
from engine.uploads.onnx_files import check_onnx
from engine.uploads.pickles import check_model_file

KEPT = (".json", ".safetensors", ".pt2", ".wbz", ".onnx", ".txt", ".model")
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")


def unpack_model_folder(archive: Path, folder: Path) -> str:
    """The `model.source` of a model folder ZIP, unpacked under `folder`: the folder of a
    bundle, `hf:FOLDER` for a Hugging Face folder, or FOLDER/model.onnx for an exported
    model with its tokenizer's files (and no safetensors) beside it."""
    data = archive.read_bytes()
    target = folder / stored_name(data, archive.stem)  # named as uploaded (short_source)
    kept: list[tuple[tuple[str, ...], object]] = []
    with open_zip(data, archive.name) as zf:
        for info in zf.infolist():
            parts = entry_parts(info.filename)
            if info.is_dir() or parts[-1].startswith(".") or parts[0] == "__MACOSX":
                continue
            suffix = PurePosixPath(parts[-1]).suffix.lower()
            if suffix in PICKLED:
                raise UserError(f"{archive.name} holds {info.filename!r}, pickled weights, "
                                f"which are never loaded; save the folder with "
                                f"safetensors (save_pretrained(..., safe_serialization=True)).")
            if suffix in KEPT:
                kept.append((parts, info))
        while kept and all(len(p) > 1 and p[0] == kept[0][0][0] for p, _ in kept):
            kept = [(p[1:], info) for p, info in kept]  # the zipped folder itself
        files: dict[str, bytes] = {}
        for parts, info in kept:
            if len(parts) > 2:  # a file or one subfolder deep (1_Pooling/, tokenizer/)
                continue
            name = "/".join(parts)
            if name in files:
                raise UserError(f"{archive.name} holds two files named {name!r}; zip one "
                                f"model folder at a time.")
            files[name] = read_entry(zf, info, archive.name)
            if name.endswith(".pt2"):
                check_model_file(files[name], parts[-1])
            if name == "model.onnx":  # its weights in the file itself
                check_onnx(files[name], name, allow_external=False)
    if "model.json" in files and "model.safetensors" in files:
        kind = "bundle"
    elif "model.onnx" in files and "model.safetensors" not in files:
        kind = "onnx"  # an exported transformer with its tokenizer (optimum's folder)
    elif "config.json" in files:
        kind = "hf"
    else:
        raise UserError(f"{archive.name} is neither a Hugging Face folder (config.json, "
                        f"model.safetensors) nor a workbench bundle (model.json, "
                        f"model.safetensors); zip the model's folder itself.")
    target.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(blob)
    if kind == "onnx":
        return str(target / "model.onnx")
    return str(target) if kind == "bundle" else f"hf:{target}"
