"""The hashes A1111 and Civitai show for a LoRA, computed in one pass and cached by (path, size, mtime).

- sha256: of the whole file;
- model hash (A1111 "AutoV2"): the first 10 hex digits of that sha256;
- short hash (A1111 "Lora hashes"): the first 12 hex digits of the sha256 of the bytes after the
  safetensors header, so that editing the metadata does not change it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from studio import paths

CACHE_FILE = "lora-hashes.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    tensor_sha256: str | None  # None for files without a safetensors header (pickles)

    @property
    def model_hash(self) -> str:
        return self.sha256[:10]

    @property
    def short_hash(self) -> str | None:
        return self.tensor_sha256[:12] if self.tensor_sha256 else None


def cache_dir() -> Path:
    """Read at call time, so that LORA_STUDIO_CACHE set after import still counts."""
    override = os.environ.get("LORA_STUDIO_CACHE")
    return Path(override) if override else paths.CACHE


def file_hashes(path: Path, data_start: int | None) -> FileHashes:
    """Hashes of `path`; `data_start` is where the tensor bytes begin (None: not a safetensors file)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    cache = _load_cache()
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns \
            and (entry.get("data_start") == data_start or data_start is None):  # the whole file's sha256 is known
        return FileHashes(entry["sha256"], entry["tensor_sha256"])
    hashes = _compute(path, data_start)
    _store(key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "data_start": data_start,
                 "sha256": hashes.sha256, "tensor_sha256": hashes.tensor_sha256})
    return hashes


def _compute(path: Path, data_start: int | None) -> FileHashes:
    whole = hashlib.sha256()
    tensors = hashlib.sha256() if data_start is not None else None
    with open(path, "rb") as f:
        if data_start is not None:
            head = f.read(data_start)
            whole.update(head)
        while chunk := f.read(_CHUNK):
            whole.update(chunk)
            if tensors is not None:
                tensors.update(chunk)
    return FileHashes(whole.hexdigest(), tensors.hexdigest() if tensors is not None else None)


_memo: dict = {}  # cache file -> ((mtime_ns, size), its entries): read again only when another process changed it


def _load_cache() -> dict:
    """The cache file's entries, parsed once per change of the file (a library of 500 files asks 500 times)."""
    file = cache_dir() / CACHE_FILE
    try:
        stat = file.stat()
    except OSError:
        return {}
    stamp = (stat.st_mtime_ns, stat.st_size)
    known = _memo.get(file)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        data = json.loads(file.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    _memo[file] = (stamp, data)
    return data


def _store(key: str, entry: dict) -> None:
    """Add one entry to the cache file: read, merge and replace it under a file lock, so that two processes (the
    web studio and a batch) hashing at once both keep their entries; the file is replaced atomically (temp file +
    rename). Best effort: a read-only cache folder only costs re-hashing next time."""
    from filelock import FileLock, Timeout

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / f"{CACHE_FILE}.lock"), timeout=30):
            cache = dict(_load_cache())
            cache[key] = entry
            tmp = folder / f"{CACHE_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, folder / CACHE_FILE)
    except (OSError, Timeout):
        pass
