"""Each composition method run the way its official code runs it: references for `studio bench speed`, never
offered to users. Each is a composer run through the studio's own session (same LoRA files, prompts, seed and
sampler), so the benchmark compares only the way the passes are run.

- clora: N+1 separate classifier-free-guidance passes per step (one per prompt, each with its own LoRA
  switched on), and for the latent update N+1 separate conditional passes whose maps feed one loss, with one
  backward through all of them (the official pipeline's loop over prompts), each through the whole UNet. Same
  maths as `clora`.
- lora_composer: explicit softmax attention in every layer, the concept-isolation mask as a dense float
  (batch, heads, queries, keys) tensor of 0 / −inf added to the scores (the official attention processors), and
  guidance passes through the whole UNet. Same maths as `lora_composer`.
- regional: one full pass per region with only that region's LoRA and prompt, plus one for the background,
  the noise predictions blended by the masks (A1111 Regional Prompter's latent mode, ComfyUI's hook LoRAs). Not
  the same maths as `regional`, which blends inside cross-attention.
- composite: one pass per LoRA, one after another (the official pipeline). Same maths as `composite`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import torch

from attention.masks import blend_weights
from attention.store import AttentionStore
from composers.base import Composer, cfg_prediction
from composers.clora import ClorComposer
from composers.lora_composer import LoraComposer
from composers.regional import RegionalParams, latent_region
from studio.engine import Session, classifier_free_guidance, unet_pass
from studio.lora.inject import only_adapters

# whether the reference computes what the studio's method computes (then the benchmark compares the images)
SAME_MATHS = {"clora": True, "lora_composer": True, "composite": True, "regional": False}


class CLoRASeparatePasses(ClorComposer):
    """CLoRA with one UNet call per prompt, as the official pipeline loops over its prompts."""

    def _pass_adapters(self, session: Session, row: int) -> list[str]:
        styles = list(session.styles())
        return styles if row == 0 else [self.concepts[row - 1]] + styles

    def _conditional_store(self, session, latents, t, keep_grad):
        maps = []
        for row in range(self.n_rows):
            store = AttentionStore(self.map_layers, keep_grad=keep_grad)
            cond = self.cond.rows(slice(self.n_rows + row, self.n_rows + row + 1) if session.do_cfg
                                  else slice(row, row + 1))
            with session.controller.override(adapter_batch_rows={}, store=store), \
                    only_adapters(session.pipe, self._pass_adapters(session, row)):
                unet_pass(session.pipe, latents, t, cond)
            maps.append(self._maps(store))
        self.guided_calls += self.n_rows
        return torch.cat(maps)

    def predict(self, session, latents, step, t):
        if not self.concepts:
            return super().predict(session, latents, step, t)
        uncond, cond, maps = [], [], []
        for row in range(self.n_rows):
            store = AttentionStore(self.map_layers, batch_index=slice(-1, None))
            rows = [row, self.n_rows + row] if session.do_cfg else [row]
            with session.controller.override(adapter_batch_rows={}, store=store), \
                    only_adapters(session.pipe, self._pass_adapters(session, row)):
                out = unet_pass(session.pipe, latents.expand(len(rows), -1, -1, -1), t, self.cond.rows(rows))
            maps.append(self._maps(store))
            uncond.append(out[:1])
            cond.append(out[-1:])
        weights = self._fusion_weights(session, torch.cat(maps), latents.shape[-2:])
        fused_c = (torch.cat(cond) * weights[:, None]).sum(0, keepdim=True)
        if not session.do_cfg:
            return fused_c
        fused_u = (torch.cat(uncond) * weights[:, None]).sum(0, keepdim=True)
        return classifier_free_guidance(fused_u, fused_c, session.guidance)


def explicit_attend(query, key, value, mask=None, want_probs=False):
    """Attention as the official LoRA-Composer processors compute it: scores, a dense float mask added, softmax."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if mask is not None:
        dense = torch.zeros(*scores.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + dense.masked_fill_(~mask.expand_as(dense), float("-inf"))
    probs = scores.softmax(-1)
    return probs @ value, (probs if want_probs else None)


class LoraComposerFullPasses(LoraComposer):
    """LoRA-Composer whose guidance passes run the whole UNet, as the official pipeline's do (with the explicit
    attention of `explicit_attend`)."""

    def _conditional_forward(self, session, latents, t, keep_grad):
        store = AttentionStore(self.map_layers, keep_grad=keep_grad)
        with session.controller.override(contexts=self._conditional_contexts(session), store=store):
            unet_pass(session.pipe, latents, t, self.cond.rows(slice(-1, None)))
        return store


class LatentRegions(Composer):
    """Regional LoRA in latent mode: a background pass and one pass per region per step, blended by mask."""
    Params = RegionalParams
    needs_regions = False

    def setup(self, session: Session) -> None:
        regions = {name: latent_region(entry, session.latent_size) for name, entry in session.adapters.items()}
        self.regions = {name: mask for name, mask in regions.items() if mask is not None}
        self.everywhere = [name for name, mask in regions.items() if mask is None]
        self.cond = session.encode([session.prompt], [session.negative_prompt], text_adapters=self.everywhere)
        self.region_conds = {}
        for name in self.regions:
            entry = session.adapters[name]
            negative = entry.negative_prompt if entry.negative_prompt is not None else session.negative_prompt
            self.region_conds[name] = session.encode([entry.prompt or session.prompt], [negative],
                                                     text_adapters=[name] + self.everywhere)
        if self.regions:
            self.weights, self.background = blend_weights(list(self.regions.values()))

    def predict(self, session, latents, step, t):
        with only_adapters(session.pipe, self.everywhere):
            out = cfg_prediction(session, latents, t, self.cond)
        if not self.regions:
            return out
        out = out * self.background.to(out)
        for (name, cond), weight in zip(self.region_conds.items(), self.weights):
            with only_adapters(session.pipe, [name] + self.everywhere):
                out = out + cfg_prediction(session, latents, t, cond) * weight.to(out)
        return out

    def passes(self, session: Session) -> float:
        return 1.0 + len(self.regions)


REFERENCES = {"clora": CLoRASeparatePasses, "lora_composer": LoraComposerFullPasses, "regional": LatentRegions}


OFFICIAL_PARAMS = {"composite": {"batched": False}}  # references that are a parameter of the studio's method


@contextlib.contextmanager
def official_way(method: str) -> Iterator[None]:
    """Within the block, compositions of `method` run the official way (with OFFICIAL_PARAMS added)."""
    if method in OFFICIAL_PARAMS:
        yield
        return
    patches = [mock.patch("studio.compose.get_composer", lambda name: REFERENCES[method])]
    if method == "lora_composer":
        patches.append(mock.patch("attention.processors.attend", explicit_attend))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield
