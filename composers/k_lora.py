"""K-LoRA (Ouyang et al., CVPR 2025, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs";
docs/methods.md §7): one content LoRA and one style LoRA; in every UNet layer both carry, at every step, only the
one whose largest |ΔW| entries weigh more is applied. One UNet pass per step.

For a layer, S_c = Σ top-k |ΔW_c| / γ and S_s = Σ top-k |ΔW_s| · s(t), k = rank_c · rank_s, γ the mean over layers of
‖ΔW_c‖₁ / ‖ΔW_s‖₁ (ratios above 3× the mean left out), s(t) = α·p + β with p the fraction of the denoising done,
taken modulo α for the "s*" pattern (the official `get_klora_weight` and `get_ratio_between_content_and_style`;
the official code counts layer calls for p, this counts steps). The content LoRA is applied where S_c > S_s.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from composers.base import Composer, cfg_prediction
from studio.engine import Session
from studio.errors import PresetError


class KLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field("s*", pattern=r"^(s\*|a\*)$",
                         description="'s*' (official default: β = 0.85·α, the scale taken modulo α) or 'a*' (β = 0.5).")
    alpha: float = Field(1.5, gt=0, description="α of the style scale s = α·p + β (official 1.5).")
    beta: float | None = Field(None, description="β of the style scale; default by pattern (1.275 for 's*', 0.5).")


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the k largest |ΔW| entries."""
    flat = delta.abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def magnitude_ratio(content: list[torch.Tensor], style: list[torch.Tensor]) -> float:
    """γ: the mean of ‖ΔW_c‖₁ / ‖ΔW_s‖₁ over layers, computed again without the layers above 3× that mean."""
    ratios = [float(c.abs().sum()) / max(float(s.abs().sum()), 1e-12) for c, s in zip(content, style)]
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else float("inf")


def style_scale(progress: float, alpha: float, beta: float, pattern: str) -> float:
    scale = alpha * progress + beta
    return scale % alpha if pattern == "s*" else scale


def rank_of(module, delta: torch.Tensor) -> int:
    return module.down.shape[0] if module.down is not None else min(delta.shape[0], delta[0].numel())


class KLoraComposer(Composer):
    name = "k_lora"
    summary = ("K-LoRA: one content and one style LoRA; in each layer and step only the one whose top-k |ΔW| "
               "dominates is applied (no boxes).")
    passes_doc = "1"
    Params = KLoraParams
    limits = ("On the bundled model a concept fused with the sepia palette keeps the palette but mostly loses its "
              "shape (`studio bench quality --suite style`).")

    def __init__(self, params=None):
        super().__init__(params)
        self.content_score: dict[str, float] = {}  # layer -> S_c (already divided by γ)
        self.style_score: dict[str, float] = {}  # layer -> top-k sum of the style's ΔW
        self.names: tuple[str, str] | None = None  # (content adapter, style adapter)
        self.layers: dict = {}
        self.content_share: list[float] = []  # per step, the share of scored layers that chose the content

    def setup(self, session: Session) -> None:
        from studio.lora.inject import lora_layers

        concepts, styles = list(session.concepts()), list(session.styles())
        if not session.adapters:
            return super().setup(session)
        if len(concepts) != 1 or len(styles) != 1 or len(session.adapters) != 2:
            files = ", ".join(Path(e.file).name for e in session.adapters.values())
            raise PresetError(f"K-LoRA fuses one content LoRA (role concept) and one style LoRA (role style); this "
                              f"composition has {len(concepts)} concept and {len(styles)} style LoRAs ({files}).")
        content, style = concepts[0], styles[0]
        self.names = (content, style)
        self.layers = {name: layer for name, layer in lora_layers(session.pipe).items()
                       if name.startswith("unet.") and content in layer.adapters and style in layer.adapters}
        # one layer's two dense ΔW at a time (all of them at once would be as large as the UNet's attention weights)
        norms, top_sums = {}, {}
        for name, layer in self.layers.items():
            (c_module, c_delta), (s_module, s_delta) = [
                (layer.adapters[a], layer.adapters[a].delta_weight(layer.base.weight) * layer.weights[a])
                for a in (content, style)]
            k = rank_of(c_module, c_delta) * rank_of(s_module, s_delta)
            norms[name] = (c_delta.abs().sum(), s_delta.abs().sum())
            top_sums[name] = (top_k_sum(c_delta, k), top_k_sum(s_delta, k))
        gamma = magnitude_ratio([c for c, _ in norms.values()], [s for _, s in norms.values()])
        for name, (c_top, s_top) in top_sums.items():
            self.content_score[name] = c_top / gamma
            self.style_score[name] = s_top
        self.cond = session.encode([session.prompt], [session.negative_prompt])  # both LoRAs' text encoders

    def predict(self, session: Session, latents: torch.Tensor, step: int, t) -> torch.Tensor:
        if self.names is None:
            return super().predict(session, latents, step, t)
        p = self.params
        beta = p.beta if p.beta is not None else (0.85 * p.alpha if p.pattern == "s*" else 0.5)
        scale = style_scale(step / session.steps, p.alpha, beta, p.pattern)
        content, style = self.names
        chose_content = 0
        for name, layer in self.layers.items():
            use_content = self.content_score[name] > self.style_score[name] * scale
            layer.override = [content if use_content else style]
            chose_content += use_content
        self.content_share.append(chose_content / max(1, len(self.layers)))
        return cfg_prediction(session, latents, t, self.cond)

    def teardown(self, session: Session) -> None:
        for layer in self.layers.values():
            layer.override = None

    def report(self) -> dict:
        return {"content_share_per_step": [round(x, 3) for x in self.content_share]} if self.names else {}
