"""Latent Couple (the Latent mode of A1111's Regional Prompter; docs/methods.md §8): one guided pass per placed
LoRA, each with only that LoRA and its region prompt, and one pass of the global prompt with none; the noise
predictions are blended by the regions' masks at latent resolution, then classifier-free guidance is applied.
The N+1 passes run as one batched UNet call, each LoRA gated to its own rows."""
from __future__ import annotations

import torch

from attention.gates import attach_gates, detach_gates
from attention.masks import blend_weights
from composers.base import Composer, interleave_cfg, row_selectors
from composers.regional import latent_region
from studio.engine import Session, classifier_free_guidance, unet_pass
from studio.errors import PresetError


class LatentCoupleComposer(Composer):
    name = "latent_couple"
    summary = ("Latent Couple: one pass per region with only its LoRA and its prompt, noise predictions blended by "
               "the regions (A1111 Regional Prompter's Latent mode; needs boxes).")
    passes_doc = "N + 1 (batched into one UNet call of 2(N+1) rows)"
    needs_regions = True

    def __init__(self, params=None):
        super().__init__(params)
        self.placed: list[str] = []
        self.weights: torch.Tensor | None = None  # (N+1, H, W): the global pass's blend weight, then each region's
        self.masks: dict[str, torch.Tensor] = {}
        self._gates: list = []

    def setup(self, session: Session) -> None:
        if any(e.region is not None and e.region.auto for e in session.adapters.values()):
            raise PresetError("Latent Couple blends each LoRA's pass inside the region it is given; for regions "
                              "placed automatically use the regional method.")
        regions = {name: latent_region(entry, session.latent_size) for name, entry in session.adapters.items()}
        self.masks = {name: mask for name, mask in regions.items() if mask is not None}
        self.placed = list(self.masks)
        everywhere = [name for name in session.adapters if name not in self.masks]
        if not self.placed:
            self.cond = session.encode([session.prompt], [session.negative_prompt])
            return
        parts = [session.encode([session.prompt], [session.negative_prompt], text_adapters=everywhere)]
        for name in self.placed:
            entry = session.adapters[name]
            negative = entry.negative_prompt if entry.negative_prompt is not None else session.negative_prompt
            parts.append(session.encode([entry.prompt or session.prompt], [negative],
                                        text_adapters=[name] + everywhere))
        self.cond = interleave_cfg(parts, session.do_cfg)
        for name, selector in zip(self.placed, row_selectors(len(parts), session.do_cfg)[1:]):
            session.controller.adapter_batch_rows[name] = selector
        region_weights, background = blend_weights([self.masks[name] for name in self.placed])
        self.weights = torch.stack([background] + region_weights)
        self._gates = attach_gates(session.pipe, session.controller)

    def predict(self, session: Session, latents: torch.Tensor, step: int, t) -> torch.Tensor:
        if not self.placed:
            return super().predict(session, latents, step, t)
        out = unet_pass(session.pipe, latents.expand(self.cond.embeds.shape[0], -1, -1, -1), t, self.cond)
        weights = self.weights.to(out)[:, None]  # (N+1, 1, H, W)
        n = len(self.placed) + 1
        if not session.do_cfg:
            return (out * weights).sum(0, keepdim=True)
        uncond, cond = out[:n], out[n:]
        return classifier_free_guidance((uncond * weights).sum(0, keepdim=True),
                                        (cond * weights).sum(0, keepdim=True), session.guidance)

    def maps_and_masks(self, session: Session) -> tuple[dict, dict]:
        return {}, {name: mask.cpu() for name, mask in self.masks.items()}

    @classmethod
    def expected_passes(cls, n_loras: int, steps: int, params, auto_regions: int = 0) -> float:
        return float(n_loras + 1) if n_loras else 1.0

    def passes(self, session: Session) -> float:
        return float(len(self.placed) + 1) if self.placed else 1.0

    def teardown(self, session: Session) -> None:
        detach_gates(self._gates)
