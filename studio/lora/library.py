"""The LoRA library: a folder of LoRA files the studio lists with their inspection. Files that cannot
be used (pickles, corrupt or unknown files) are listed with the reason, never hidden."""
from __future__ import annotations

import os
import stat as stat_module
from dataclasses import dataclass
from pathlib import Path

from studio.errors import LoraError
from studio.lora.hashes import cache_dir
from studio.lora.inspect import LORA_SUFFIXES, LoraInfo, inspect_lora


@dataclass
class LibraryEntry:
    path: Path
    info: LoraInfo | None  # None when the file cannot be used
    error: str | None  # the one-sentence reason, when it cannot

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def usable(self) -> bool:
        return self.info is not None

    def to_json(self, hashes: bool = True) -> dict:
        if self.info is not None:
            return {"usable": True, **self.info.to_json(hashes=hashes)}
        return {"usable": False, "path": str(self.path), "name": self.name, "error": self.error}


def library_folder(folder: str | Path | None = None) -> Path:
    """The folder given, else $LORA_STUDIO_LORAS, else <cache>/loras."""
    if folder is not None:
        return Path(folder).expanduser()
    env = os.environ.get("LORA_STUDIO_LORAS")
    return Path(env).expanduser() if env else cache_dir() / "loras"


def scan_library(folder: str | Path | None = None) -> list[LibraryEntry]:
    """Every LoRA-like file under the folder (recursively), sorted by path; an absent folder is empty. Only headers
    are read, and only of files new or changed since the last scan in this process; hashes wait until asked for."""
    root = library_folder(folder)
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES)
    return [entry for entry in map(inspect_entry, files) if entry is not None]


_scanned: dict[Path, tuple[tuple[int, int], LibraryEntry]] = {}  # path -> ((size, mtime_ns), its entry)


def inspect_entry(path: Path) -> LibraryEntry | None:
    """The library's entry for one file, from the last scan when the file has not changed; None if it is gone or is
    not a regular file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    if not stat_module.S_ISREG(stat.st_mode):
        return None
    stamp = (stat.st_size, stat.st_mtime_ns)
    known = _scanned.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        entry = LibraryEntry(path, inspect_lora(path), None)
    except LoraError as exc:
        entry = LibraryEntry(path, None, str(exc))
    _scanned[path] = (stamp, entry)
    return entry


def find_lora_file(name: str, folders: list[Path], sha256: str | None = None) -> Path:
    """A LoRA file by name in `folders` (searched recursively, in order), A1111's way: the file name, or its stem
    without the suffix; an exact match before a case-insensitive one. With `sha256`, only a file with that hash
    counts (a copied library under another path still finds it)."""
    from studio.lora.hashes import file_hashes

    wanted = name.lower()
    exact, loose = [], []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES):
            if name in (path.name, path.stem):
                exact.append(path)
            elif wanted in (path.name.lower(), path.stem.lower()):
                loose.append(path)
    for path in exact + loose:
        if sha256 is None or file_hashes(path, None).sha256 == sha256.lower():
            return path
    if not exact and not loose and sha256 is None:  # A1111 also finds a LoRA by its `ss_output_name`
        from studio.a1111 import resolve_lora_name

        try:
            return resolve_lora_name(name, folders)
        except LoraError:
            pass
    where = ", ".join(str(Path(f)) for f in folders)
    if (exact or loose) and sha256:
        raise LoraError(f"A LoRA named {name} is in the library but none has the sha256 {sha256[:12]}… the "
                        "composition recorded; the file has changed.")
    raise LoraError(f"No LoRA named {name} in the library folders ({where}).")
