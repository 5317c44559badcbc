"""One-pass regional LoRA (docs/methods.md §1): the studio's core mechanism.

Every LoRA-carrying layer computes y = W x + Σ_i m_i ⊙ ΔW_i x, with m_i region i's mask at that layer's
token grid; cross-attention computes keys and values per region (that region's LoRA, that region's
prompt encoded with that LoRA's text-encoder part) and blends the outputs by mask; the background takes
the global prompt. Style LoRAs and concepts without a region apply everywhere. One UNet pass per step.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from attention.controller import CrossContext
from attention.gates import attach_gates, detach_gates
from attention.masks import box_mask, image_mask
from attention.processors import composer_layers, install_processors
from attention.store import AttentionStore
from attention.tokens import content_token_indices, token_indices
from composers.base import Composer
from studio.engine import Session


class RegionalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regional_layers: str = Field("all", pattern="^(all|cross_attention)$",
                                 description="LoRA layers masked by region: every layer ('all') or only "
                                             "cross-attention ('cross_attention').")


def latent_region(entry, latent_size: tuple[int, int]) -> torch.Tensor | None:
    if entry.region is None:
        return None
    if entry.region.box is not None:
        return box_mask(entry.region.box, *latent_size)
    return image_mask(entry.region.mask, *latent_size)


class RegionalComposer(Composer):
    name = "regional"
    summary = "One-pass regional LoRA: each concept LoRA acts only inside its region, with its own prompt."
    passes_doc = "1 (every region in the same UNet call)"
    Params = RegionalParams

    def __init__(self, params=None):
        super().__init__(params)
        self.token_positions: dict[str, list[int]] = {}
        self.map_layers: set[str] = set()
        self._previous: dict | None = None
        self._gates: list = []

    def setup(self, session: Session) -> None:
        ctrl = session.controller
        ctrl.regional_layers = self.params.regional_layers
        regions = {name: latent_region(entry, session.latent_size) for name, entry in session.adapters.items()}
        ctrl.adapter_regions = {name: mask for name, mask in regions.items() if mask is not None}
        everywhere = [name for name, mask in regions.items() if mask is None]
        self.cond = session.encode([session.prompt], [session.negative_prompt], text_adapters=everywhere)
        ctrl.contexts = [CrossContext("global", self.cond.embeds, None, everywhere)]
        for name, mask in ctrl.adapter_regions.items():
            entry = session.adapters[name]
            prompt = entry.prompt or session.prompt
            negative = entry.negative_prompt if entry.negative_prompt is not None else session.negative_prompt
            cond = session.encode([prompt], [negative], text_adapters=[name] + everywhere)
            ctrl.contexts.append(CrossContext(name, cond.embeds, mask, [name] + everywhere))
            tokenizer = session.pipe.tokenizer
            self.token_positions[name] = (token_indices(tokenizer, prompt, entry.trigger_words)
                                          or content_token_indices(tokenizer, prompt))
        self._previous = install_processors(session.pipe.unet, ctrl)
        self._gates = attach_gates(session.pipe, ctrl)
        self.map_layers = set(composer_layers(session.pipe.unet))

    def predict(self, session, latents, step, t):
        if step == session.steps - 1 and session.controller.contexts[1:]:  # maps of the last step, for the UI
            session.controller.store = AttentionStore(self.map_layers, batch_index=slice(-1, None))
        return super().predict(session, latents, step, t)

    def maps_and_masks(self, session):
        return context_maps_and_masks(session, self.token_positions)

    def teardown(self, session):
        if self._previous is not None:
            session.pipe.unet.set_attn_processor(self._previous)
        detach_gates(self._gates)


def context_maps_and_masks(session: Session, token_positions: dict[str, list[int]]):
    """Per concept: its trigger tokens' cross-attention map at the composer layers (normalised to [0, 1])
    and its region mask, both at the stored layers' grid."""
    ctrl = session.controller
    maps, masks = {}, {}
    store = ctrl.store
    for context in ctrl.contexts:
        if context.mask is None:
            continue
        if store is not None and store.maps:
            n_queries = next(iter(store.maps.values())).shape[-2]
            grid = ctrl.grid(n_queries)
            values = store.token_maps(context.name, token_positions[context.name], grid)[0]
            maps[context.name] = (values / values.max().clamp(min=1e-8)).cpu()
        masks[context.name] = context.mask.cpu()
    return maps, masks
