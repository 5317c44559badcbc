"""What a pickle would import if it were loaded, read without loading it (pickletools walks the opcodes and
executes nothing), as picklescan does: a file that imports `builtins.exec` or `os.system` is a program."""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

MAX_SCAN_BYTES = 64 << 20
# what torch.save'd tensors legitimately import (torch's own weights_only allow-list, in short)
SAFE_MODULES = ("torch", "collections", "numpy", "_codecs")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}


def pickle_imports(path: Path) -> list[str]:
    """`module.name` of every global the pickle (or each pickle inside torch.save's zip) imports."""
    streams = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(info) for info in archive.infolist()
                           if info.filename.endswith(".pkl") and info.file_size <= MAX_SCAN_BYTES]
        else:
            with open(path, "rb") as f:
                streams = [f.read(MAX_SCAN_BYTES)]
    except (OSError, zipfile.BadZipFile):
        return []
    found = []
    for data in streams:
        strings: list[str] = []  # the strings pushed so far (STACK_GLOBAL takes the last two)
        memo: dict = {}
        pushed = None  # the string the previous opcode pushed, if it pushed one
        try:
            for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
                just_pushed, pushed = pushed, None
                if opcode.name in _STRING_OPS:
                    strings.append(str(arg))
                    pushed = str(arg)
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = just_pushed
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = just_pushed
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and memo.get(arg) is not None:
                    strings.append(memo[arg])
                    pushed = memo[arg]
                elif opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:  # noqa: BLE001 — a malformed stream: what was read so far is the answer
            pass
    return list(dict.fromkeys(found))


def unsafe_imports(path: Path) -> list[str]:
    return [name for name in pickle_imports(path)
            if not any(name.startswith(module + ".") for module in SAFE_MODULES)]
