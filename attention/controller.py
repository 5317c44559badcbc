"""The one object that owns per-generation state (prompt-to-prompt's AttentionControl, Attend-and-Excite's
AttentionStore): regions rasterised per layer grid, the step index, stored maps. Processors and LoRA
gates only read it, keyed by layer name."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Iterator

import torch

from attention.masks import blend_weights, isolation_mask, resize_mask, token_grid
from attention.store import AttentionStore

# LoRA layers whose input is text tokens: never masked spatially (regions get their own K/V instead).
TEXT_INPUT_SUFFIXES = (".attn2.to_k", ".attn2.to_v")


@dataclass
class CrossContext:
    """One text context of cross-attention: the global prompt (mask None = background) or a region's prompt.

    `adapters` are the LoRA adapters active in to_k / to_v while this context's keys and values are
    computed (None = leave the layers as they are)."""
    name: str
    embeddings: torch.Tensor  # (batch, tokens, dim), batch rows matching the UNet batch
    mask: torch.Tensor | None = None  # (H, W) at latent resolution
    adapters: list[str] | None = None


@dataclass
class CompositionController:
    latent_size: tuple[int, int]
    step: int = 0
    adapter_regions: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter -> (H, W) latent mask
    adapter_batch_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter -> (B,) 0/1 per row
    regional_layers: str = "all"  # "all": every LoRA layer is masked; "cross_attention": only attn2 (official LoRA-Composer)
    contexts: list[CrossContext] = field(default_factory=list)
    isolate_concepts: bool = False
    store: AttentionStore | None = None
    # cross-attention keys and values per (layer, context): they depend on the text alone, so one generation computes
    # them once (processors record them here; `cross_kv_key` says when they may)
    cross_kv: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # --- grids and masks -------------------------------------------------------------------------
    def grid(self, n_tokens: int) -> tuple[int, int]:
        return token_grid(n_tokens, *self.latent_size)

    def region_at(self, adapter: str, rows: int, cols: int) -> torch.Tensor:
        key = ("region", adapter, rows, cols)
        if key not in self._cache:
            self._cache[key] = resize_mask(self.adapter_regions[adapter], rows, cols)
        return self._cache[key]

    def context_weights(self, rows: int, cols: int) -> list[torch.Tensor]:
        """Blend weight (rows·cols,) of each cross-attention context; regions average where they overlap,
        the background context takes what no region covers."""
        key = ("contexts", rows, cols, len(self.contexts))
        if key not in self._cache:
            regional = [c for c in self.contexts if c.mask is not None]
            masks = [resize_mask(c.mask, rows, cols) for c in regional]
            weights = {}
            if masks:
                region_weights, background = blend_weights(masks)
                weights = {c.name: w for c, w in zip(regional, region_weights)}
            else:
                background = torch.ones(rows, cols)
            self._cache[key] = [weights.get(c.name, background).flatten() for c in self.contexts]
        return self._cache[key]

    def context_support(self, rows: int, cols: int) -> list[torch.Tensor | None]:
        """Per context, the token indices where its blend weight is not zero, or None where that is every token:
        a context's attention need only be computed there."""
        key = ("support", rows, cols, len(self.contexts))
        if key not in self._cache:
            supports = []
            for weight in self.context_weights(rows, cols):
                indices = torch.nonzero(weight, as_tuple=True)[0]
                supports.append(None if len(indices) == len(weight) else indices)
            self._cache[key] = supports
        return self._cache[key]

    @staticmethod
    def cross_kv_key(layer: str, context: CrossContext) -> tuple | None:
        """The key under which a context's keys and values at `layer` are kept for the generation, or None when they
        must be computed each time (text embeddings that carry gradients)."""
        embeddings = context.embeddings
        if embeddings.requires_grad:
            return None
        return (layer, context.name, embeddings.data_ptr(), tuple(embeddings.shape), embeddings.dtype,
                tuple(context.adapters) if context.adapters is not None else None)

    def isolation_at(self, rows: int, cols: int) -> torch.Tensor | None:
        regional = [c.mask for c in self.contexts if c.mask is not None]
        if not self.isolate_concepts or len(regional) < 2:
            return None
        key = ("isolation", rows, cols)
        if key not in self._cache:
            self._cache[key] = isolation_mask([resize_mask(m, rows, cols) for m in regional])
        return self._cache[key]

    # --- LoRA gates ----------------------------------------------------------------------------------
    def lora_gate(self, layer_name: str, adapter: str, delta: torch.Tensor) -> torch.Tensor | None:
        """The mask applied to one adapter's delta output in one layer (None = everywhere):
        y = W x + Σ_i m_i ⊙ ΔW_i x (docs/methods.md §1). Text encoders are run one prompt at a time with their
        adapters chosen by `only_adapters`, so they are never gated."""
        if layer_name.startswith("text_encoder"):
            return None
        gate = None
        rows_sel = self.adapter_batch_rows.get(adapter)
        if rows_sel is not None:
            shape = (-1,) + (1,) * (delta.dim() - 1)
            gate = rows_sel.to(delta.dtype).to(delta.device).reshape(shape)
        region = self.adapter_regions.get(adapter)
        if region is None or layer_name.endswith(TEXT_INPUT_SUFFIXES):
            return gate
        if self.regional_layers == "cross_attention" and (".attn2." not in layer_name
                                                          or layer_name.endswith(".attn2.to_q")):
            # the official cross-attention mode: the concept's LoRA gives its region the keys and values of its own
            # text (to_k / to_v) and the attention output (to_out), never the queries
            return torch.zeros((), dtype=delta.dtype, device=delta.device)
        if delta.dim() == 4:  # conv: (B, C, H, W)
            spatial = self.region_at(adapter, delta.shape[-2], delta.shape[-1])[None, None]
        elif delta.dim() == 3:  # tokens: (B, N, C)
            rows, cols = self.grid(delta.shape[1])
            spatial = self.region_at(adapter, rows, cols).reshape(1, -1, 1)
        else:  # no spatial axis (time-embedding projections): a region-bound delta cannot be localised there
            spatial = torch.zeros(())
        spatial = spatial.to(delta.dtype).to(delta.device)
        return spatial if gate is None else gate * spatial

    # --- per-generation state ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def override(self, **changes) -> Iterator["CompositionController"]:
        """Fields set for the duration of a block (e.g. a guidance pass over the conditional rows only, with its
        own attention store), then put back as they were, whatever happens; the cached masks follow."""
        names = {f.name for f in fields(self)} - {"_cache", "cross_kv"}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise AttributeError(f"CompositionController has no field {unknown[0]!r}")
        saved = {name: getattr(self, name) for name in changes}
        cache, self._cache = self._cache, {}
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
            self._cache = cache

    def place(self, adapter: str, mask: torch.Tensor, context: CrossContext) -> None:
        """Give an adapter its region and its cross-attention context from this step on (a concept placed during
        the run, e.g. from its attention maps); the cached masks follow."""
        self.adapter_regions[adapter] = mask
        self.adapter_batch_rows.pop(adapter, None)
        self.contexts.append(context)
        self._cache.clear()

    def reset_step(self, step: int) -> None:
        self.step = step
        if self.store is not None:
            self.store.clear()
