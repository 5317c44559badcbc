"""LoRA Studio: compose several LoRAs on a diffusion model.

    from studio import Studio, Composition, Lora, Region
"""
from __future__ import annotations

_EXPORTS = {"Studio": "studio.api", "Result": "studio.api", "Results": "studio.api", "LoraLibrary": "studio.api",
            "Composition": "studio.spec", "Lora": "studio.spec", "LoraEntry": "studio.spec", "Region": "studio.spec",
            "StudioError": "studio.errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Imported on first use, so that `import studio` (and the CLI's start) stays light."""
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), "LoraEntry" if name == "Lora" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
