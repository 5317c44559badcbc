"""The LoRA library: a folder of LoRA files the studio lists with their inspection. Files that cannot
be used (pickles, corrupt or unknown files) are listed with the reason, never hidden."""
from __future__ import annotations

import os
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

    def to_json(self) -> dict:
        if self.info is not None:
            return {"usable": True, **self.info.to_json()}
        return {"usable": False, "path": str(self.path), "name": self.name, "error": self.error}


def library_folder(folder: str | Path | None = None) -> Path:
    """The folder given, else $LORA_STUDIO_LORAS, else <cache>/loras."""
    if folder is not None:
        return Path(folder).expanduser()
    env = os.environ.get("LORA_STUDIO_LORAS")
    return Path(env).expanduser() if env else cache_dir() / "loras"


def scan_library(folder: str | Path | None = None) -> list[LibraryEntry]:
    """Every LoRA-like file under the folder (recursively), sorted by path; an absent folder is empty."""
    root = library_folder(folder)
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    return [inspect_entry(path) for path in files]


def inspect_entry(path: Path) -> LibraryEntry:
    try:
        return LibraryEntry(path, inspect_lora(path), None)
    except LoraError as exc:
        return LibraryEntry(path, None, str(exc))
