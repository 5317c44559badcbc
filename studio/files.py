"""Writing files so that a crash or a kill never leaves half of one: write a temporary file in the same folder,
flush it to disk, then rename it over the target (a rename within one file system is atomic)."""
from __future__ import annotations

import io
import os
from pathlib import Path

TEMP_SUFFIX = ".partial"


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def png_bytes(image, pnginfo=None) -> bytes:
    """The PNG encoding of a PIL image (deterministic for the same pixels and metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def remove_partial_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer left in `folder`; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
