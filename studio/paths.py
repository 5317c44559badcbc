"""Where the studio finds its bundled assets and keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LORA_STUDIO_ASSETS", PROJECT_ROOT / "assets"))
DEFAULT_MODEL = ASSETS / "shapes-world"
TOKENIZER = ASSETS / "clip_tokenizer"
JUDGE = ASSETS / "judge" / "judge.safetensors"
EXAMPLE_LORAS = ASSETS / "loras"
EXAMPLE_PRESETS = ASSETS / "presets"
EXAMPLE_B4M = ASSETS / "b4m"
CACHE = Path(os.environ.get("LORA_STUDIO_CACHE", Path.home() / ".cache" / "lora-studio"))
