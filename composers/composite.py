"""Composite (Zhong et al. 2024; METHODS §0): every step, one classifier-free-guidance pass per LoRA with
only that LoRA active; ε_u and ε_c are the means over LoRAs, then CFG. The N passes run as ONE batched
UNet call of 2N rows (LoRA k gated to its own rows)."""
from __future__ import annotations

from composers.base import Composer, cfg_prediction, interleave_cfg, row_selectors
from composers.regional import attach_gates, detach_gates
from studio.engine import Session, classifier_free_guidance, unet_pass


class CompositeComposer(Composer):
    name = "composite"
    summary = "Composite: one pass per LoRA, predictions averaged before guidance."
    passes_doc = "N (batched into one UNet call of 2N rows)"

    def setup(self, session: Session) -> None:
        self.names = list(session.adapters)
        if not self.names:
            return super().setup(session)
        for name, selector in zip(self.names, row_selectors(len(self.names), session.do_cfg)):
            session.controller.adapter_batch_rows[name] = selector
        parts = [session.encode([session.prompt], [session.negative_prompt], text_adapters=[n]) for n in self.names]
        self.cond = interleave_cfg(parts, session.do_cfg)
        self._gates = attach_gates(session)

    def predict(self, session, latents, step, t):
        if not self.names:
            return cfg_prediction(session, latents, t, self.cond)
        n = len(self.names)
        out = unet_pass(session.pipe, latents.expand(self.cond.embeds.shape[0], -1, -1, -1), t, self.cond)
        if not session.do_cfg:
            return out.mean(0, keepdim=True)
        return classifier_free_guidance(out[:n].mean(0, keepdim=True), out[n:].mean(0, keepdim=True), session.guidance)

    def passes(self, session: Session) -> float:
        return float(max(1, len(session.adapters)))

    def teardown(self, session: Session) -> None:
        if self.names:
            detach_gates(self._gates)
            session.controller.adapter_batch_rows = {}
