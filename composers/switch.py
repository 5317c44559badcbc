"""Switch (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation"; docs/methods.md §0): one LoRA
active at a time, round-robin every `switch_step` denoising steps, on the official callback's schedule. One UNet pass
per step."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from composers.base import Composer, cfg_prediction, per_lora_conditionings
from studio.engine import Session


class SwitchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    switch_step: int = Field(5, ge=1, description="Denoising steps per LoRA before switching (official 5).")
    text_encoding: Literal["per_lora", "official"] = Field(
        "per_lora", description="'per_lora': the prompt encoded with the active LoRA's text encoder; 'official': "
                                "encoded once, with the first LoRA's, as the official pipeline does.")


def scheduled_adapter(names: list[str], step: int, switch_step: int) -> str:
    """The official callback switches at the end of every step i > 0 with i % switch_step == 0, so the first LoRA
    runs steps 0 … switch_step (one more than the others) and each next one switch_step steps."""
    turn = 0 if step <= switch_step else 1 + (step - switch_step - 1) // switch_step
    return names[turn % len(names)]


class SwitchComposer(Composer):
    name = "switch"
    summary = "Switch: one LoRA at a time, round-robin every k steps."
    passes_doc = "1"
    Params = SwitchParams
    limits = ("One LoRA at a time: two concepts are seldom both right, and the first LoRA's shape bleeds into the "
              "second's (`studio bench quality`).")

    def __init__(self, params=None):
        super().__init__(params)
        self.names: list[str] = []
        self.conds: dict = {}
        self.schedule: list[str] = []

    def setup(self, session: Session) -> None:
        self.names = list(session.adapters)
        official = self.params.text_encoding == "official" and self.names
        self.conds = per_lora_conditionings(session, self.names, self.names[:1] if official else None)
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
