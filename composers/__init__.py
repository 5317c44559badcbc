"""Composition methods, one module each, all behind `composers.base.Composer`; discovered by name, so a
new method is one new file."""
from __future__ import annotations

import importlib
import pkgutil

from composers.base import Composer

_REGISTRY: dict[str, type[Composer]] | None = None


def registry() -> dict[str, type[Composer]]:
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for module in pkgutil.iter_modules(__path__):
            if module.name == "base" or module.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{__name__}.{module.name}")
            for value in vars(mod).values():
                if isinstance(value, type) and issubclass(value, Composer) and value is not Composer \
                        and getattr(value, "name", None) and value.__module__ == mod.__name__:
                    found[value.name] = value
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def get_composer(name: str) -> type[Composer]:
    methods = registry()
    if name not in methods:
        from studio.errors import PresetError

        raise PresetError(f"Unknown method {name!r}; choose one of {', '.join(methods)}.")
    return methods[name]
