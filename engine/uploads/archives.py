"""Upload basics: the size cap and other limits, safe names, and ZIP archive checks.

The limits come from environment variables, read at each call (through
`engine.settings`): WORKBENCH_UPLOAD_LIMIT_MB (200, also Streamlit's
server.maxUploadSize), WORKBENCH_ZIP_MAX_ENTRIES (50,000), WORKBENCH_ZIP_MAX_MB (1,024,
uncompressed) and WORKBENCH_ZIP_MAX_RATIO (200).
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from engine.errors import UserError
from engine.recipe import STORED
from engine.settings import UPLOAD_LIMIT_ENV, env_int, upload_limit_mb


def stored_name(data: bytes, name: str) -> str:
    """The name an upload (or the folder unpacked from one) is stored under: HASH_NAME,
    which `engine.recipe.short_source` gives back as NAME."""
    return f"{hashlib.sha256(data).hexdigest()[:12]}_{STORED.sub('', name)}"


Source = bytes | str | Path

ZIP_ENTRIES_ENV = "WORKBENCH_ZIP_MAX_ENTRIES"
ZIP_MB_ENV = "WORKBENCH_ZIP_MAX_MB"
ZIP_RATIO_ENV = "WORKBENCH_ZIP_MAX_RATIO"
DEFAULT_ZIP_ENTRIES = 50_000
DEFAULT_ZIP_MB = 1024
DEFAULT_ZIP_RATIO = 200
RATIO_FLOOR = 1 << 20  # entries smaller than this unpacked are never called bombs
MAX_NAME_LENGTH = 100
MAX_NESTING = 2  # a torch.save archive inside a .pt2 archive, no deeper

MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".pkl", ".pickle", ".bin", ".ckpt", ".jit")
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"


# --- limits --------------------------------------------------------------------------------

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


def read_all(source: Source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def head(source: Source, n: int = 8) -> bytes:
    if isinstance(source, bytes):
        return source[:n]
    with open(source, "rb") as fh:
        return fh.read(n)


def label(source: Source, name: str | None) -> str:
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
    if head(source, 4) in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
        return True
    with _open(source) as fh:
        return zipfile.is_zipfile(fh)


def zipfile_of(source: Source) -> zipfile.ZipFile:
    """A path is opened (and closed) by ZipFile itself; bytes are read from memory."""
    return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)


def open_zip(source: Source, name: str, what: str = "ZIP archive") -> zipfile.ZipFile:
    """A `ZipFile` on an archive that passed `check_zip`; close it after use."""
    check_zip(source, name, what)
    return zipfile_of(source)


def entry_parts(filename: str) -> tuple[str, ...]:
    """An entry's path components, with backslashes read as separators."""
    return PurePosixPath(filename.replace("\\", "/")).parts


def check_zip(source: Source, name: str, what: str = "ZIP archive") -> None:
    """Structure and limits of a ZIP archive, from its directory alone (nothing is read)."""
    limits = zip_limits()
    try:
        with zipfile_of(source) as zf:
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


def read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    try:
        return zf.read(info)
    except Exception:  # any failure to decompress hostile bytes is the file's
        raise UserError(f"{name}: the entry {info.filename!r} cannot be read (a damaged or "
                        f"forged archive); create it again.") from None


