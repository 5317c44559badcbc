"""The one small interface every composition method implements.

A composer is told about a generation through a `studio.engine.Session` (pipeline, sizes, seed,
controller, attached LoRAs) and takes part in the shared sampler loop through four hooks:
`setup` (processors, prompts), `before_sampling` (latent re-initialisation), `guide` (a gradient step
on the latents) and `predict` (its UNet passes, noise fusion and classifier-free guidance).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from studio.engine import Conditioning, Session, classifier_free_guidance, unet_pass


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Composer:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `studio methods`
    passes_doc: ClassVar[str]  # UNet passes per step, in words
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_regions: ClassVar[bool] = False  # True: every concept LoRA must have a box or mask
    limits: ClassVar[str] = ""  # what it does not achieve on the bundled model, as `studio bench quality` measured it

    def __init__(self, params: BaseModel | dict | None = None):
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
        self.cond: Conditioning | None = None

    # --- hooks of the sampler loop -----------------------------------------------------------------------
    def setup(self, session: Session) -> None:
        """Default: every attached LoRA active everywhere, the global prompt."""
        self.cond = session.encode([session.prompt], [session.negative_prompt])

    def before_sampling(self, session: Session, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def guide(self, session: Session, latents: torch.Tensor, step: int, t) -> torch.Tensor:
        return latents

    def predict(self, session: Session, latents: torch.Tensor, step: int, t) -> torch.Tensor:
        return cfg_prediction(session, latents, t, self.cond)

    def maps_and_masks(self, session: Session) -> tuple[dict, dict]:
        return {}, {}

    def teardown(self, session: Session) -> None:
        pass

    def report(self) -> dict:
        """What the method did, for the result's info (e.g. switch's schedule, guidance losses)."""
        return {}

    def passes(self, session: Session) -> float:
        """UNet passes per step (a batch-2 classifier-free-guidance call counts as one pass)."""
        return 1.0

    @classmethod
    def expected_passes(cls, n_loras: int, steps: int, params: BaseModel, auto_regions: int = 0) -> float:
        """The `passes` a run will report, estimated before it runs (the web studio's cost line); `auto_regions`:
        how many of the LoRAs have a region placed automatically."""
        return 1.0

    @classmethod
    def describe(cls) -> dict:
        schema = cls.Params.model_json_schema()
        params = {name: {"default": spec.get("default"), "description": spec.get("description", ""),
                         "type": spec.get("type", spec.get("anyOf", ""))}
                  for name, spec in schema.get("properties", {}).items()}
        return {"name": cls.name, "summary": cls.summary, "unet_passes_per_step": cls.passes_doc,
                "needs_regions": cls.needs_regions, "limits": cls.limits, "params": params}


def cfg_prediction(session: Session, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
    """One UNet call on [uncond, cond] and classifier-free guidance, as the diffusers pipelines do it."""
    if not session.do_cfg:
        return unet_pass(session.pipe, latents, t, cond)
    out = unet_pass(session.pipe, torch.cat([latents, latents]), t, cond)
    uncond, text = out.chunk(2)
    return classifier_free_guidance(uncond, text, session.guidance)


def blended_guidance(session: Session, out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One batched call's n passes ([uncond_0..uncond_{n-1}, cond_0..cond_{n-1}] with CFG) blended by their (n, H, W)
    weights, unconditional and conditional rows alike, then guided."""
    n = weights.shape[0]
    weights = weights[:, None]  # (n, 1, H, W)
    if not session.do_cfg:
        return (out * weights).sum(0, keepdim=True)
    return classifier_free_guidance((out[:n] * weights).sum(0, keepdim=True), (out[n:] * weights).sum(0, keepdim=True),
                                    session.guidance)


def per_lora_conditionings(session: Session, names: list[str], shared_adapters: list[str] | None = None
                           ) -> dict[str, Conditioning]:
    """The prompt encoded for each LoRA's pass: with that LoRA's text-encoder part, or (`shared_adapters`, the
    official pipelines' single encoding) once with those adapters' parts, shared by every pass."""
    prompts, negatives = [session.prompt], [session.negative_prompt]
    if shared_adapters is not None:
        once = session.encode(prompts, negatives, text_adapters=shared_adapters)
        return {name: once for name in names}
    return {name: session.encode(prompts, negatives, text_adapters=[name]) for name in names}


def row_selectors(n_passes: int, do_cfg: bool) -> list[torch.Tensor]:
    """For a batched call of n_passes passes ([uncond_0..uncond_{n-1}, cond_0..cond_{n-1}] with CFG), the
    0/1 row selector of each pass."""
    rows = 2 * n_passes if do_cfg else n_passes
    selectors = []
    for k in range(n_passes):
        selector = torch.zeros(rows)
        selector[k] = 1.0
        if do_cfg:
            selector[n_passes + k] = 1.0
        selectors.append(selector)
    return selectors


def interleave_cfg(parts: list[Conditioning], do_cfg: bool) -> Conditioning:
    """Rows [uncond_0..uncond_{n-1}, cond_0..cond_{n-1}] from per-pass [uncond, cond] conditionings."""
    if not do_cfg:
        return Conditioning.cat(parts)
    return Conditioning.cat([c.rows(slice(0, 1)) for c in parts] + [c.rows(slice(1, 2)) for c in parts])
