"""Composite (Zhong et al. 2024; docs/methods.md §0): every step, one classifier-free-guidance pass per LoRA with
only that LoRA active; ε_u and ε_c are the means over LoRAs, then CFG. By default the N passes run as
ONE batched UNet call of 2N rows (LoRA k gated to its own rows); `batched=False` runs them one after
another, as the peers do (less memory)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from composers.base import Composer, cfg_prediction, interleave_cfg, per_lora_conditionings, row_selectors
from attention.gates import attach_gates, detach_gates
from studio.engine import Session, classifier_free_guidance, unet_pass


class CompositeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batched: bool = Field(True, description="All LoRAs' passes in one batched UNet call (else one call each).")
    text_encoding: Literal["per_lora", "official"] = Field(
        "per_lora", description="'per_lora': each pass's prompt encoded with its LoRA's text encoder; 'official': "
                                "encoded once with every LoRA's, as the official pipeline does.")


class CompositeComposer(Composer):
    name = "composite"
    summary = "Composite: one pass per LoRA, predictions averaged before guidance."
    passes_doc = "N (batched into one UNet call of 2N rows by default)"
    Params = CompositeParams
    limits = ("Averaging the LoRAs' predictions blurs both concepts: two concepts are seldom both right (`studio "
              "bench quality`).")

    def __init__(self, params=None):
        super().__init__(params)
        self.names: list[str] = []
        self.conds: dict = {}
        self._gates: list = []

    def setup(self, session: Session) -> None:
        self.names = list(session.adapters)
        if not self.names:
            return super().setup(session)
        official = self.params.text_encoding == "official"
        self.conds = per_lora_conditionings(session, self.names, self.names if official else None)
        if self.params.batched:
            for name, selector in zip(self.names, row_selectors(len(self.names), session.do_cfg)):
                session.controller.adapter_batch_rows[name] = selector
            self.cond = interleave_cfg([self.conds[n] for n in self.names], session.do_cfg)
            self._gates = attach_gates(session.pipe, session.controller)

    def predict(self, session, latents, step, t):
        if not self.names:
            return cfg_prediction(session, latents, t, self.cond)
        if not self.params.batched:
            from studio.lora.inject import only_adapters

            predictions = []
            for name in self.names:
                with only_adapters(session.pipe, [name]):
                    predictions.append(cfg_prediction(session, latents, t, self.conds[name]))
            return torch.stack(predictions).mean(0)  # CFG is linear: the mean of guided = guided of the means
        n = len(self.names)
        out = unet_pass(session.pipe, latents.expand(self.cond.embeds.shape[0], -1, -1, -1), t, self.cond)
        if not session.do_cfg:
            return out.mean(0, keepdim=True)
        return classifier_free_guidance(out[:n].mean(0, keepdim=True), out[n:].mean(0, keepdim=True), session.guidance)

    @classmethod
    def expected_passes(cls, n_loras: int, steps: int, params, auto_regions: int = 0) -> float:
        return float(max(1, n_loras))

    def passes(self, session: Session) -> float:
        return float(max(1, len(session.adapters)))

    def teardown(self, session: Session) -> None:
        detach_gates(self._gates)
