"""One-pass regional LoRA (docs/methods.md §1): the studio's core mechanism.

Every LoRA-carrying layer computes y = W x + Σ_i m_i ⊙ ΔW_i x, with m_i region i's mask at that layer's
token grid; cross-attention computes keys and values per region (that region's LoRA, that region's
prompt encoded with that LoRA's text-encoder part) and blends the outputs by mask; the background takes
the global prompt. Style LoRAs and concepts without a region apply everywhere. One UNet pass per step.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from attention.controller import CrossContext
from attention.gates import attach_gates, detach_gates
from attention.masks import box_mask, image_mask
from attention.processors import composer_layers, install_processors
from attention.store import AttentionStore
from attention.tokens import content_token_indices, deal_tokens, token_indices, word_occurrences
from composers.base import Composer
from studio.engine import Session
from studio.errors import PresetError


class RegionalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regional_layers: str = Field("all", pattern="^(all|cross_attention)$",
                                 description="LoRA layers masked by region: every layer ('all') or only "
                                             "cross-attention ('cross_attention').")
    concept_isolation: bool = Field(True, description="Self-attention: places in one concept's region do not attend "
                                                      "places in another's (LoRA-Composer's concept isolation); without "
                                                      "it small objects vanish beside large ones.")
    auto_steps: int = Field(3, ge=1, description="Concepts placed automatically (region auto): the first steps, run "
                                                 "once without their LoRAs, whose attention to their trigger words "
                                                 "places them before the run starts.")
    auto_threshold: float = Field(0.2, gt=0, lt=1, description="A place joins a concept's automatic region where "
                                                                "its map is above this share of its peak and above "
                                                                "the other concepts' maps.")
    auto_dilate: int = Field(1, ge=0, description="Automatic regions grown by this many cells of the attention grid "
                                                  "(an object is larger than where its word attends most).")


def latent_region(entry, latent_size: tuple[int, int]) -> torch.Tensor | None:
    if entry.region is None or entry.region.auto:
        return None
    if entry.region.box is not None:
        return box_mask(entry.region.box, *latent_size)
    return image_mask(entry.region.mask, *latent_size)


class RegionalComposer(Composer):
    name = "regional"
    summary = "One-pass regional LoRA: each concept LoRA acts only inside its region, with its own prompt."
    passes_doc = "1 (every region in the same UNet call)"
    Params = RegionalParams
    limits = ("A concept under a style LoRA whose word stands before the concept's trigger often vanishes (7 of 12 in "
              "`studio bench quality --suite style`), since the trigger no longer reads as its LoRA learnt it.")

    def __init__(self, params=None):
        super().__init__(params)
        self.token_positions: dict[str, list[int]] = {}
        self.map_layers: set[str] = set()
        self._previous: dict | None = None
        self._gates: list = []
        self.auto_tokens: dict[str, list[int]] = {}  # concept placed automatically -> its tokens in the global prompt
        self.auto_maps: dict[str, torch.Tensor] = {}  # ... -> its attention map summed over the probing steps
        self._everywhere: list[str] = []  # adapters acting everywhere (styles, concepts given no region)
        self.region_conds: dict = {}  # placed concept -> its region prompt encoded with its text-encoder part

    def setup(self, session: Session) -> None:
        ctrl = session.controller
        ctrl.regional_layers = self.params.regional_layers
        ctrl.isolate_concepts = self.params.concept_isolation
        regions = {name: latent_region(entry, session.latent_size) for name, entry in session.adapters.items()}
        ctrl.adapter_regions = {name: mask for name, mask in regions.items() if mask is not None}
        auto = [name for name, entry in session.adapters.items() if entry.region is not None and entry.region.auto]
        self.auto_tokens = self._auto_tokens(session, auto)
        for name in auto:  # off until placed: gated to no row of the batch
            ctrl.adapter_batch_rows[name] = torch.zeros(2 if session.do_cfg else 1)
        self._everywhere = [name for name, mask in regions.items() if mask is None and name not in auto]
        self.cond = session.encode([session.prompt], [session.negative_prompt], text_adapters=self._everywhere)
        ctrl.contexts = [CrossContext("global", self.cond.embeds, None, self._everywhere)]
        for k, (name, mask) in enumerate(ctrl.adapter_regions.items()):
            ctrl.contexts.append(self._region_context(session, name, mask))
            self.token_positions[name] = self.concept_tokens(session, k, name)
        self._previous = install_processors(session.pipe.unet, ctrl)
        self._gates = attach_gates(session.pipe, ctrl)
        self.map_layers = set(composer_layers(session.pipe.unet))

    def _region_context(self, session: Session, name: str, mask: torch.Tensor) -> CrossContext:
        """A placed concept's cross-attention context: its region prompt encoded with its own text-encoder part and
        those of the adapters acting everywhere."""
        entry = session.adapters[name]
        negative = entry.negative_prompt if entry.negative_prompt is not None else session.negative_prompt
        adapters = [name] + self._everywhere
        cond = session.encode([entry.prompt or session.prompt], [negative], text_adapters=adapters)
        self.region_conds[name] = cond
        return CrossContext(name, cond.embeds, mask, adapters)

    def concept_tokens(self, session: Session, index: int, name: str) -> list[int]:
        """The tokens of placed concept `index` (named `name`) whose maps show it: its trigger words in its region
        prompt, else every word of that prompt (here they only draw its map)."""
        entry = session.adapters[name]
        prompt, tokenizer = entry.prompt or session.prompt, session.pipe.tokenizer
        return token_indices(tokenizer, prompt, entry.trigger_words) or content_token_indices(tokenizer, prompt)

    def _auto_tokens(self, session: Session, auto: list[str]) -> dict[str, list[int]]:
        """Each automatically placed concept's trigger words in the global prompt, every occurrence given to one
        concept only (two LoRAs bound to one word: the first occurrence to the first)."""
        if not auto:
            return {}
        tokenizer = session.pipe.tokenizer
        claims = [[o for word in session.adapters[name].trigger_words
                   for o in word_occurrences(tokenizer, session.prompt, word)] for name in auto]
        dealt = deal_tokens(claims)
        missing = [name for k, name in enumerate(auto) if k not in dealt]
        if missing:
            entry = session.adapters[missing[0]]
            raise PresetError(f"A region placed automatically follows the concept's trigger words in the prompt; "
                              f"{Path(entry.file).name} has trigger words {entry.trigger_words}, and the prompt "
                              f"{session.prompt!r} has none of them for it.")
        return {name: dealt[k] for k, name in enumerate(auto)}

    def before_sampling(self, session: Session, latents: torch.Tensor) -> torch.Tensor:
        """Concepts placed automatically: the first `auto_steps` steps are run once without their LoRAs, on a copy
        of the scheduler, recording where their trigger words attend; then each gets its region and the sampling
        starts from the same noise, every concept composed in one pass."""
        if not self.auto_tokens:
            return latents
        import copy

        ctrl, pipe = session.controller, session.pipe
        scheduler = copy.deepcopy(pipe.scheduler)
        # a generator of its own, so that the run's noise is the same with or without the probe
        extra = pipe.prepare_extra_step_kwargs(torch.Generator("cpu").manual_seed(0), 0.0)
        z = latents
        for step, t in enumerate(scheduler.timesteps[:self.params.auto_steps]):
            store = AttentionStore(self.map_layers, batch_index=slice(-1, None))
            with torch.no_grad(), ctrl.override(store=store):
                prediction = super().predict(session, z, step, t)
            grid = ctrl.grid(next(iter(store.maps.values())).shape[-2])
            for name, positions in self.auto_tokens.items():
                values = store.token_maps("global", positions, grid)[0]
                self.auto_maps[name] = self.auto_maps.get(name, 0) + values
            z = scheduler.step(prediction, t, z, **extra, return_dict=False)[0]
        self._place_auto_regions(session)
        return latents

    def predict(self, session, latents, step, t):
        ctrl = session.controller
        if step == session.steps - 1 and ctrl.contexts[1:]:  # maps of the last step, for the UI
            ctrl.store = AttentionStore(self.map_layers, batch_index=slice(-1, None))
        return super().predict(session, latents, step, t)

    def passes(self, session: Session) -> float:
        return self.expected_passes(len(session.adapters), session.steps, self.params, len(self.auto_tokens))

    @classmethod
    def expected_passes(cls, n_loras: int, steps: int, params, auto_regions: int = 0) -> float:
        """The probing steps that place automatic regions are one more pass each, spread over the run."""
        return 1.0 + (min(params.auto_steps, steps) / steps if auto_regions else 0.0)

    def _place_auto_regions(self, session: Session) -> None:
        """Each automatic concept's region from its summed map: the places where its map, normalised to its peak,
        is above `auto_threshold` and above every other automatic concept's; then its region prompt and LoRA act
        there, as a drawn region's do."""
        names = list(self.auto_tokens)
        maps = torch.stack([self.auto_maps[n] / self.auto_maps[n].max().clamp(min=1e-8) for n in names])
        winner = maps.argmax(0)
        latent_h, latent_w = session.latent_size
        for k, name in enumerate(names):
            grid_mask = ((winner == k) & (maps[k] > self.params.auto_threshold)).float()
            if self.params.auto_dilate:
                size = 2 * self.params.auto_dilate + 1
                grown = F.max_pool2d(grid_mask[None, None], size, stride=1, padding=self.params.auto_dilate)[0, 0]
                unclaimed = (winner == k) | (maps.amax(0) <= self.params.auto_threshold)
                grid_mask = grown * unclaimed.float()
            mask = F.interpolate(grid_mask[None, None], size=(latent_h, latent_w), mode="nearest")[0, 0]
            session.controller.place(name, mask, self._region_context(session, name, mask))
            self.token_positions[name] = self.concept_tokens(session, len(session.controller.adapter_regions) - 1, name)


    def maps_and_masks(self, session):
        return context_maps_and_masks(session, self.token_positions)

    def teardown(self, session):
        if self._previous is not None:
            session.pipe.unet.set_attn_processor(self._previous)
        detach_gates(self._gates)


def context_maps_and_masks(session: Session, token_positions: dict[str, list[int]]):
    """Per concept: its trigger tokens' cross-attention map at the composer layers, where its context applies (its
    region's blend weight: outside it, the context's keys are computed but never used), normalised to [0, 1]; and
    its region mask."""
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
            weight = ctrl.context_weights(*grid)[ctrl.contexts.index(context)].reshape(grid).to(values)
            values = values * weight
            maps[context.name] = (values / values.max().clamp(min=1e-8)).cpu()
        masks[context.name] = context.mask.cpu()
    return maps, masks
