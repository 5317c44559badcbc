"""Break-for-Make (Xu et al., ACM TOG 2025, arXiv 2403.19456; docs/methods.md §4): a B4M content adapter and a
B4M style adapter made from one seed, assembled into one ordinary LoRA, or one adapter `studio b4m make` made.
The adapters are trained by `studio.training.b4m` (break, make)."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from composers.base import Composer
from studio.engine import Session
from studio.errors import PresetError
from studio.training.plp import NOT_B4M, assemble, assembled_weights


class B4MParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="Weight of the assembled adapter.")


class B4MComposer(Composer):
    name = "b4m"
    summary = ("Break-for-Make: assemble a B4M content adapter and a B4M style adapter (same seed) into one "
               "LoRA, or run one made by `studio b4m make`; refuses ordinary LoRAs.")
    passes_doc = "1 (the assembled adapter is one ordinary LoRA)"
    Params = B4MParams

    def __init__(self, params=None):
        super().__init__(params)
        self.fused = None  # the pair assembled here, when given a pair
        self._restore: dict[str, float] | None = None  # the adapters' weights before setup

    def setup(self, session: Session) -> None:
        from studio.lora.inject import attach_lora, attached_adapters, set_lora_weights

        if not session.adapters:
            return super().setup(session)
        roles = {name: session.loras[name].info.metadata.get("b4m_role") for name in session.adapters}
        for name, role in roles.items():
            if role is None:
                raise PresetError(NOT_B4M.format(name=Path(session.adapters[name].file).name))
        self._restore = attached_adapters(session.pipe)
        if list(roles.values()) == ["assembled"]:  # made already, e.g. with the joint fine-tune: attached as it is
            set_lora_weights(session.pipe, {name: self.params.weight for name in roles})
            return super().setup(session)
        content = [n for n, r in roles.items() if r == "content"]
        style = [n for n, r in roles.items() if r == "style"]
        if len(content) != 1 or len(style) != 1 or len(roles) != 2:
            raise PresetError("The b4m method needs one B4M content adapter and one B4M style adapter, which it "
                              "assembles, or one adapter made by `studio b4m make`.")
        self.fused = assemble(Path(session.adapters[content[0]].file), Path(session.adapters[style[0]].file))
        # the assembled adapter replaces the two: both set to weight 0, the fused one attached
        set_lora_weights(session.pipe, {name: 0.0 for name in session.adapters})
        first = session.loras[content[0]]
        attach_lora(session.pipe, assembled_weights(self.fused, first.info), "b4m_assembled", self.params.weight)
        self.cond = session.encode([session.prompt], [session.negative_prompt], text_adapters=[])

    def teardown(self, session: Session) -> None:
        from studio.lora.inject import detach_lora, set_lora_weights

        if self.fused is not None:
            detach_lora(session.pipe, "b4m_assembled")
        if self._restore is not None:
            set_lora_weights(session.pipe, self._restore)
