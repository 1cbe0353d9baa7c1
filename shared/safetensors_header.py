"""Reading a safetensors file's header, and checking it, without reading tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data offsets) and the data. A hostile file can claim anything in its header:
a 1 GiB tensor in a sparse file that costs nothing on disk, overlapping or out-of-range
offsets, a deeply nested header. :func:`read_header` parses the header within bounds and
checks that every tensor's byte range matches its dtype and shape and that the ranges tile
the data exactly (so the header's total equals the file's size), before any data is read.
Callers then compare the shapes with what they expect (see ``shared.peft_adapter``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from shared.bounded_json import BoundedJsonError, loads_bounded

MAX_HEADER_BYTES = 8 * 1024 * 1024
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # the dtypes LoRA weights may have


class HeaderError(ValueError):
    """The file is missing, unreadable or its header is inconsistent; ``str(err)`` is one line."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the header declares it: dtype, shape and byte range within the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorSpec]:
    """The tensors ``path`` declares (``__metadata__`` dropped), checked against the file size."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < length <= MAX_HEADER_BYTES:
                raise HeaderError("bad header length")
            text = f.read(length)
            file_size = path.stat().st_size
    except FileNotFoundError:
        raise HeaderError("file not found") from None
    except OSError as exc:
        raise HeaderError(f"unreadable: {exc}") from None
    try:
        header = loads_bounded(text, MAX_HEADER_BYTES, max_depth=4, max_number_chars=20)
    except BoundedJsonError as exc:
        raise HeaderError(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    specs = {key: _tensor_spec(key, info) for key, info in header.items() if key != "__metadata__"}
    _check_tiling(specs, file_size - 8 - length)
    return specs


def _tensor_spec(key: str, info: object) -> TensorSpec:
    """One header entry as a TensorSpec; HeaderError unless dtype, shape and range agree."""
    if not isinstance(info, dict):
        raise HeaderError(f"bad entry for {key[:200]}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in FLOAT_DTYPES:
        raise HeaderError(f"unsupported dtype {str(dtype)[:20]!r} for {key[:200]} (want one of {sorted(FLOAT_DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise HeaderError(f"bad shape for {key[:200]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise HeaderError(f"bad data_offsets for {key[:200]}")
    spec = TensorSpec(dtype, tuple(shape), offsets[0], offsets[1])
    if spec.end - spec.start != spec.numel * FLOAT_DTYPES[dtype]:
        raise HeaderError(f"data_offsets of {key[:200]} do not match its dtype and shape")
    return spec


def _check_tiling(specs: dict[str, TensorSpec], data_bytes: int) -> None:
    """The byte ranges must cover the data exactly, without gaps or overlaps."""
    position = 0
    for spec in sorted(specs.values(), key=lambda s: s.start):
        if spec.start != position:
            raise HeaderError("tensor data ranges overlap or leave gaps")
        position = spec.end
    if position != data_bytes:
        raise HeaderError("the file is truncated or has trailing bytes")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
