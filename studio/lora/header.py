"""The safetensors header, read by hand: an 8-byte little-endian length, then a JSON object of
`name -> {dtype, shape, data_offsets}` plus an optional flat string map `__metadata__`. Reading it
never touches the tensor bytes, so inspecting a 2 GB file costs one small read."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from studio.errors import LoraError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's own limit

# struct codes of the scalar dtypes an `alpha` tensor may have; BF16 is widened by hand.
_SCALAR_CODES = {"F16": "<e", "F32": "<f", "F64": "<d", "I32": "<i", "I64": "<q", "BF16": "<H"}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the first tensor byte

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.tensors.items()}


def read_header(path: Path) -> SafetensorsHeader:
    """The parsed header, or a LoraError naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoraError(f"{path.name} is not a safetensors file: it is only {len(prefix)} bytes long.")
            (length,) = struct.unpack("<Q", prefix)
            size = os.fstat(f.fileno()).st_size
            if length == 0 or length > min(MAX_HEADER_BYTES, size - 8):
                disguised = _pickle_kind(prefix)
                if disguised:
                    from studio.lora.picklescan import unsafe_imports

                    unsafe = unsafe_imports(path)
                    imports = f" (this one would import {', '.join(unsafe[:3])})" if unsafe else ""
                    raise LoraError(f"{path.name} is {disguised}, not safetensors; pickles can execute code when "
                                    f"loaded{imports}, so it is refused unloaded.")
                if MAX_HEADER_BYTES < length <= size - 8:
                    raise LoraError(f"{path.name} has a {length / 2**20:.0f} MiB safetensors header (metadata); "
                                    f"more than {MAX_HEADER_BYTES // 2**20} MiB is refused, as the safetensors "
                                    "library does.")
            if length == 0 or length > MAX_HEADER_BYTES:
                raise LoraError(f"{path.name} is not a safetensors file: its header length ({length} bytes) is "
                                "impossible.")
            raw = f.read(length)
    except OSError as exc:
        raise LoraError(f"{path.name} cannot be read ({exc.strerror or exc}).") from exc
    if len(raw) < length:
        raise LoraError(f"{path.name} is truncated: its header announces {length} bytes but the file ends before.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path.name} has a corrupt safetensors header (not valid JSON: "
                        f"{exc.__class__.__name__}).") from exc
    if not isinstance(header, dict):
        raise LoraError(f"{path.name} has a corrupt safetensors header (not a JSON object).")
    return _parse(path, header, data_start=8 + length)


def _pickle_kind(prefix: bytes) -> str | None:
    """What a file's first bytes say it is when it is a pickle in disguise: torch.save's zip archive, or a raw
    pickle stream (protocol 2+ starts with 0x80 and the protocol number)."""
    if prefix.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's pickle format)"
    if prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a Python pickle"
    return None


def _parse(path: Path, header: dict, data_start: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraError(f"{path.name} has a corrupt safetensors header (__metadata__ is not a string map).")
    tensors = {}
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            tensors[name] = TensorEntry(str(entry["dtype"]), shape, int(start), int(end))
        except (TypeError, KeyError, ValueError) as exc:
            raise LoraError(f"{path.name} has a corrupt safetensors header (entry {name!r} is malformed).") from exc
    data_size = path.stat().st_size - data_start
    if any(t.end > data_size for t in tensors.values()):
        raise LoraError(f"{path.name} is truncated: its tensors extend past the end of the file.")
    return SafetensorsHeader(tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def read_scalar(path: Path, header: SafetensorsHeader, name: str) -> float | None:
    """The value of a one-element tensor (a LoRA `alpha`), read with one seek: no tensor library needed."""
    entry = header.tensors.get(name)
    code = _SCALAR_CODES.get(entry.dtype) if entry is not None else None
    if code is None or entry.end - entry.start != struct.calcsize(code):
        return None
    with open(path, "rb") as f:
        f.seek(header.data_start + entry.start)
        (value,) = struct.unpack(code, f.read(entry.end - entry.start))
    if entry.dtype == "BF16":
        (value,) = struct.unpack("<f", struct.pack("<I", value << 16))
    return float(value)
