"""The shipped file of a PyTorch variant: architecture plus compressed weights (`.wbz`).

`size_bytes` of every PyTorch variant, the baseline included, is the length of this file,
so sizes compare like with like and a compression counts only when the bytes really go:
zeros cost nothing only when their positions are stored compactly, k-bit weights cost k
bits only when at most 2^k values occur, and Huffman coding counts the code table too.

Each tensor takes the smallest of these encodings that reproduce it:
- `f32` or `f16` (when every value is exactly a float16), raw;
- a codebook of its distinct values with fixed-width or Huffman-coded indices, whole
  tensor or one codebook per row (per-channel quantization);
- an affine grid per row, value = offset + step * q with k-bit q (int8-style), kept only
  when it reproduces every value to within 1e-6 of the row's range;
and, when the tensor has zeros, the same for its non-zero values alone plus their
positions, as a bitmask or as Huffman-coded gaps (Han et al.'s relative indices).
Huffman coding is used only for variants that asked for it (weight sharing, Deep
Compression), so the other variants' sizes are plain fixed-width ones.

`decode` reverses it; `load` rebuilds a built-in style `nn.Sequential` from the
architecture in the header, so the file is a real deployable format, tested end to end.
"""

from __future__ import annotations

import heapq
import json
import math
import struct
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.quantizers import ActivationFakeQuant

MAGIC = b"WBZ1"
_LAYERS = {"Linear": ("in_features", "out_features"),
           "Conv1d": ("in_channels", "out_channels", "kernel_size", "stride", "padding"),
           "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding"),
           "MaxPool1d": ("kernel_size",), "MaxPool2d": ("kernel_size",),
           "Flatten": (), "ReLU": (), "Tanh": (), "GELU": (), "Sigmoid": (), "LeakyReLU": (),
           "Dropout": ("p",), "Unflatten": ("dim", "unflattened_size"), "Identity": ()}


# --- bit packing and canonical Huffman codes ----------------------------------------------

def _pack(values: np.ndarray, bits: int) -> bytes:
    """Fixed-width unsigned integers, `bits` each, most significant bit first."""
    if len(values) == 0 or bits == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    matrix = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(matrix.astype(np.uint8).ravel()).tobytes()


def _unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    if count == 0 or bits == 0:
        return np.zeros(count, dtype=np.int64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count * bits]
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return flat.reshape(count, bits).astype(np.int64) @ weights


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths per symbol (0 for unused symbols; 1 when only one is used)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = [int(i) for i in np.nonzero(counts)[0]]
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(counts[i]), i, [i]) for i in used]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def _canonical(lengths: np.ndarray) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length), canonical order: shorter codes first, then by symbol."""
    codes: dict[int, tuple[int, int]] = {}
    code, prev = 0, 0
    for length, symbol in sorted((int(n), s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - prev
        codes[symbol] = (code, length)
        code += 1
        prev = length
    return codes


def _huffman(symbols: np.ndarray, n_symbols: int) -> tuple[bytes, bytes, int]:
    """(code lengths table, bitstream, number of bits) for `symbols` in [0, n_symbols)."""
    lengths = _code_lengths(np.bincount(symbols, minlength=n_symbols))
    codes = _canonical(lengths)
    width = int(lengths.max()) if len(lengths) else 0
    table = np.zeros((n_symbols, max(width, 1)), dtype=np.uint8)
    for s, (code, n) in codes.items():
        for i in range(n):
            table[s, i] = (code >> (n - 1 - i)) & 1
    rows = table[symbols]
    keep = np.arange(max(width, 1))[None, :] < lengths[symbols][:, None]
    stream = rows[keep]
    return lengths.astype(np.uint8).tobytes(), np.packbits(stream).tobytes(), int(stream.size)


def _unhuffman(table: bytes, stream: bytes, n_bits: int, count: int) -> np.ndarray:
    lengths = np.frombuffer(table, dtype=np.uint8).astype(np.int64)
    decode = {(n, code): s for s, (code, n) in _canonical(lengths).items()}
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n_bits]
    out = np.empty(count, dtype=np.int64)
    code = length = k = 0
    for b in bits.tolist():
        code, length = (code << 1) | b, length + 1
        symbol = decode.get((length, code))
        if symbol is not None:
            out[k] = symbol
            k += 1
            code = length = 0
    return out[:k]


# --- value encodings -----------------------------------------------------------------------

def _bits_for(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def _indices(idx: np.ndarray, n_symbols: int, huffman: bool) -> tuple[dict, list[bytes]]:
    fixed = {"coding": "fixed", "bits": _bits_for(n_symbols)}
    best = (fixed, [_pack(idx, fixed["bits"])])
    if huffman and n_symbols > 1:
        table, stream, n_bits = _huffman(idx, n_symbols)
        if len(table) + len(stream) < len(best[1][0]):
            best = ({"coding": "huffman", "bits": n_bits}, [table, stream])
    return best


def _float_bytes(values: np.ndarray) -> tuple[str, bytes]:
    half = values.astype(np.float16)
    if np.array_equal(half.astype(np.float32), values):
        return "f16", half.tobytes()
    return "f32", values.astype(np.float32).tobytes()


def _value_options(values: np.ndarray, rows: int, huffman: bool) -> list[tuple[dict, list[bytes]]]:
    """Candidate encodings of a 1-D float32 array (viewed as `rows` equal rows)."""
    kind, raw = _float_bytes(values)
    options = [({"values": kind}, [raw])]
    uniq, idx = np.unique(values, return_inverse=True)
    if 1 < len(uniq) <= 4096 or len(uniq) == 1:
        book_kind, book = _float_bytes(uniq)
        spec, blobs = _indices(idx, len(uniq), huffman)
        options.append(({"values": "codebook", "book": book_kind, "n": len(uniq), **spec},
                        [book, *blobs]))
    if rows > 1 and len(values) % rows == 0:
        per_row = values.reshape(rows, -1)
        books, idxs = zip(*(np.unique(r, return_inverse=True) for r in per_row), strict=True)
        width = max(len(b) for b in books)
        if width <= 256:  # one codebook per row (per-channel quantization)
            padded = np.stack([np.pad(b, (0, width - len(b)), constant_values=b[-1])
                               for b in books])
            book_kind, book = _float_bytes(padded.ravel())
            spec, blobs = _indices(np.concatenate(idxs), width, huffman)
            options.append(({"values": "row_codebook", "book": book_kind, "n": width, **spec},
                            [book, *blobs]))
        grid = _affine_rows(per_row)
        if grid is not None:  # int8-style: offset + step * q per row
            offsets, steps, q, levels = grid
            spec, blobs = _indices(q.ravel(), levels, huffman)
            options.append(({"values": "affine", "n": levels, **spec},
                            [np.stack([offsets, steps], 1).astype(np.float32).tobytes(),
                             *blobs]))
    return options


def _affine_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    rows = rows.astype(np.float64)
    lo = rows.min(1)
    spans = rows.max(1) - lo
    steps = np.ones_like(lo)
    for i, row in enumerate(rows):
        diffs = np.diff(np.unique(row))
        if len(diffs):  # the grid step: the span over the number of levels it holds
            steps[i] = spans[i] / max(1.0, np.rint(spans[i] / diffs.min()))
    q = np.rint((rows - lo[:, None]) / steps[:, None]).astype(np.int64)
    if q.max(initial=0) >= 256:
        return None
    rebuilt = (lo[:, None] + steps[:, None] * q).astype(np.float32)
    if np.abs(rebuilt - rows).max(initial=0) > 1e-6 * max(float(spans.max(initial=0)), 1e-12):
        return None
    return lo, steps, q, int(q.max(initial=0)) + 1


def _encode_tensor(t: np.ndarray, huffman: bool) -> tuple[dict, list[bytes]]:
    flat = t.astype(np.float32).ravel()
    rows = t.shape[0] if t.ndim >= 2 else 1
    best = min(_value_options(flat, rows, huffman), key=lambda o: sum(map(len, o[1])))
    nonzero = flat != 0
    n_nz = int(nonzero.sum())
    if 0 < n_nz < len(flat) * 0.75:  # worth trying positions + non-zero values
        positions = [({"positions": "mask"}, [np.packbits(nonzero).tobytes()])]
        where = np.nonzero(nonzero)[0]
        gaps = np.diff(where, prepend=-1) - 1
        gap_spec, gap_blobs = _indices(gaps, int(gaps.max()) + 1, huffman)
        positions.append(({"positions": "gaps", "n_gaps": int(gaps.max()) + 1,
                           **{f"gap_{k}": v for k, v in gap_spec.items()}}, gap_blobs))
        pos = min(positions, key=lambda o: sum(map(len, o[1])))
        vals = min(_value_options(flat[nonzero], 1, huffman), key=lambda o: sum(map(len, o[1])))
        candidate = ({**pos[0], **vals[0], "nnz": n_nz}, pos[1] + vals[1])
        if sum(map(len, candidate[1])) < sum(map(len, best[1])):
            best = candidate
    return best


def _decode_values(spec: dict, blobs: list[bytes], count: int, rows: int) -> np.ndarray:
    kind = spec["values"]
    if kind in ("f16", "f32"):
        return np.frombuffer(blobs[0], dtype=np.float16 if kind == "f16" else np.float32
                             ).astype(np.float32)[:count]
    if kind == "affine":
        table = np.frombuffer(blobs[0], dtype=np.float32).reshape(-1, 2)
        q = _read_indices(spec, blobs[1:], count).reshape(len(table), -1)
        return (table[:, :1] + table[:, 1:] * q).astype(np.float32).ravel()
    book = np.frombuffer(blobs[0], dtype=np.float16 if spec["book"] == "f16" else np.float32
                         ).astype(np.float32)
    idx = _read_indices(spec, blobs[1:], count)
    if kind == "codebook":
        return book[idx]
    book = book.reshape(rows, spec["n"])
    return book[np.repeat(np.arange(rows), count // rows), idx]


def _read_indices(spec: dict, blobs: list[bytes], count: int, prefix: str = "") -> np.ndarray:
    if spec[f"{prefix}coding"] == "huffman":
        return _unhuffman(blobs[0], blobs[1], spec[f"{prefix}bits"], count)
    return _unpack(blobs[0], spec[f"{prefix}bits"], count)


# --- the file ------------------------------------------------------------------------------

def architecture(model: nn.Module) -> list[dict[str, Any]] | None:
    """The layer list of an nn.Sequential of standard layers (nested ones too), or None."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = []
    for name, child in model.named_children():
        kind = type(child).__name__
        if isinstance(child, nn.Sequential):
            inner = architecture(child)
            if inner is None:
                return None
            layers.append({"name": name, "type": "Sequential", "layers": inner})
            continue
        if kind == "ActivationFakeQuant":  # quantization-aware training's frozen quantizers
            layers.append({"name": name, "type": kind,
                           "args": {"bits": round(math.log2(child.levels + 1))}})
            continue
        if kind not in _LAYERS:
            return None
        args = {a: getattr(child, a) for a in _LAYERS[kind]}
        if kind in ("Linear", "Conv1d", "Conv2d"):
            args["bias"] = child.bias is not None
        layers.append({"name": name, "type": kind, "args": args})
    return layers


def _build(layers: list[dict[str, Any]]) -> nn.Sequential:
    built: OrderedDict[str, nn.Module] = OrderedDict()
    for layer in layers:
        if layer["type"] == "Sequential":
            built[layer["name"]] = _build(layer["layers"])
        elif layer["type"] == "ActivationFakeQuant":
            built[layer["name"]] = quant = ActivationFakeQuant(**layer["args"])
            quant.frozen = True
        else:
            args = layer["args"]
            if "unflattened_size" in args:
                args = {**args, "unflattened_size": tuple(args["unflattened_size"])}
            built[layer["name"]] = getattr(nn, layer["type"])(**args)
    return nn.Sequential(built)


def encode(model: nn.Module, *, huffman: bool = False) -> bytes:
    """The `.wbz` bytes of `model`: header (architecture, tensor specs), then the blobs."""
    entries, blobs = [], []
    for name, tensor in model.state_dict().items():
        array = tensor.detach().cpu().float().numpy()
        spec, parts = _encode_tensor(array, huffman)
        entries.append({"name": name, "shape": list(array.shape), **spec,
                        "sizes": [len(p) for p in parts]})
        blobs.extend(parts)
    header = zlib.compress(json.dumps({"architecture": architecture(model),
                                       "tensors": entries}, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def decode(data: bytes) -> tuple[list[dict[str, Any]] | None, dict[str, torch.Tensor]]:
    """(architecture, state_dict) from `.wbz` bytes."""
    if data[:4] != MAGIC:
        raise ValueError("not a .wbz file")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(zlib.decompress(data[8:8 + n]))
    offset, state = 8 + n, {}
    for entry in header["tensors"]:
        parts = []
        for size in entry["sizes"]:
            parts.append(data[offset:offset + size])
            offset += size
        shape = entry["shape"]
        count = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 else 1
        if "positions" in entry:
            nnz = entry["nnz"]
            if entry["positions"] == "mask":
                mask = np.unpackbits(np.frombuffer(parts[0], dtype=np.uint8))[:count].astype(bool)
                used = 1
            else:
                n_gap_blobs = 2 if entry["gap_coding"] == "huffman" else 1
                gaps = _read_indices(entry, parts[:n_gap_blobs], nnz, prefix="gap_")
                mask = np.zeros(count, dtype=bool)
                mask[np.cumsum(gaps + 1) - 1] = True
                used = n_gap_blobs
            flat = np.zeros(count, dtype=np.float32)
            flat[mask] = _decode_values(entry, parts[used:], nnz, 1)
        else:
            flat = _decode_values(entry, parts, count, rows)
        state[entry["name"]] = torch.from_numpy(flat.reshape(shape).copy())
    return header["architecture"], state


def load(data: bytes) -> nn.Module:
    """Rebuild the model from `.wbz` bytes (built-in style nn.Sequential models)."""
    layers, state = decode(data)
    if layers is None:
        raise ValueError("this .wbz holds weights only; load them into the model's graph")
    model = _build(layers)
    model.load_state_dict(state)
    return model.eval()


def breakdown(data: bytes) -> list[dict[str, Any]]:
    """Where the bytes go: one row per tensor with its encoding and size."""
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(zlib.decompress(data[8:8 + n]))
    rows = [{"tensor": "(header: architecture and specs)", "encoding": "zlib JSON",
             "bytes": 8 + n}]
    for e in header["tensors"]:
        parts = [e.get("positions"), e["values"], e.get("coding")]
        rows.append({"tensor": e["name"], "encoding": " + ".join(p for p in parts if p),
                     "bytes": sum(e["sizes"])})
    return rows
