"""Merge (docs/methods.md §0): every LoRA active everywhere, y = W x + Σ_i w_i ΔW_i x — the exact sum of deltas,
what diffusers' `set_adapters(names, weights)` computes. One UNet pass per step."""
from __future__ import annotations

from composers.base import Composer


class MergeComposer(Composer):
    name = "merge"
    summary = "Merge: all LoRAs active everywhere at once (exact sum of their deltas)."
    passes_doc = "1"
