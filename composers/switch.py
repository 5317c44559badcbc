"""Switch (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation"; docs/methods.md §0): one LoRA
active at a time, round-robin every `switch_step` denoising steps. One UNet pass per step."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from composers.base import Composer, cfg_prediction
from studio.engine import Session


class SwitchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    switch_step: int = Field(5, ge=1, description="Denoising steps per LoRA before switching (official 5).")


def scheduled_adapter(names: list[str], step: int, switch_step: int) -> str:
    return names[(step // switch_step) % len(names)]


class SwitchComposer(Composer):
    name = "switch"
    summary = "Switch: one LoRA at a time, round-robin every k steps."
    passes_doc = "1"
    Params = SwitchParams

    def __init__(self, params=None):
        super().__init__(params)
        self.names: list[str] = []
        self.conds: dict = {}
        self.schedule: list[str] = []

    def setup(self, session: Session) -> None:
        self.names = list(session.adapters)
        self.conds = {name: session.encode([session.prompt], [session.negative_prompt], text_adapters=[name])
                      for name in self.names}
        self.cond = None if self.names else session.encode([session.prompt], [session.negative_prompt])

    def report(self) -> dict:
        return {"schedule": list(self.schedule)}

    def predict(self, session, latents, step, t):
        from studio.lora.inject import lora_layers, only_adapters

        if not self.names:
            return cfg_prediction(session, latents, t, self.cond)
        active = scheduled_adapter(self.names, step, self.params.switch_step)
        self.schedule.append(active)
        with only_adapters(list(lora_layers(session.pipe).values()), [active]):
            return cfg_prediction(session, latents, t, self.conds[active])
