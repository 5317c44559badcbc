"""Attention maps recorded during a UNet call, keyed by layer name (never by call order)."""
from __future__ import annotations

import torch


class AttentionStore:
    """Records attention probabilities of chosen layers for the current step.

    Cross-attention maps are stored per context (the global prompt or a region / concept prompt) as
    (batch, heads, queries, tokens) restricted to the rows of `batch_index` (the conditional half only).
    """

    def __init__(self, layers: set[str], batch_index: slice | torch.Tensor | None = None, keep_grad: bool = False):
        self.layers = set(layers)
        self.batch_index = batch_index
        self.keep_grad = keep_grad
        self.maps: dict[tuple[str, str], torch.Tensor] = {}

    def wants(self, layer: str) -> bool:
        return layer in self.layers

    def record(self, layer: str, context: str, probs: torch.Tensor) -> None:
        if self.batch_index is not None:
            probs = probs[self.batch_index]
        self.maps[(layer, context)] = probs if self.keep_grad else probs.detach()

    def clear(self) -> None:
        self.maps.clear()

    def token_maps(self, context: str, token_indices: list[int], grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean over layers and heads of the maps of `token_indices` of one context, summed over those
        tokens: (batch, rows, cols) at the stored layers' grid (all stored layers share one grid)."""
        selected = [m for (layer, ctx), m in self.maps.items() if ctx == context]
        if not selected:
            raise KeyError(f"no maps stored for context {context!r}")
        stacked = torch.stack([m.mean(1) for m in selected]).mean(0)  # (batch, queries, tokens)
        values = stacked[..., token_indices].sum(-1)
        if grid is not None:
            values = values.reshape(values.shape[0], *grid)
        return values

    def self_maps(self) -> torch.Tensor:
        """Mean over layers and heads of stored self-attention maps: (batch, queries, keys)."""
        selected = [m for (layer, ctx), m in self.maps.items() if ctx == "self"]
        if not selected:
            raise KeyError("no self-attention maps stored")
        return torch.stack([m.mean(1) for m in selected]).mean(0)
