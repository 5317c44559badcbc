import pytest
import torch

from studio.compose import compose
from studio.errors import PresetError
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red sks on the left, white background"


def test_scores_follow_the_official_formulas():
    from composers.k_lora import magnitude_ratio, style_scale, top_k_sum

    delta = torch.tensor([[3.0, -5.0], [1.0, -0.5]])
    assert top_k_sum(delta, 2) == 8.0 and top_k_sum(delta, 10) == 9.5
    content = [torch.full((2, 2), v) for v in (1.0, 2.0, 1.0, 2.0, 30.0)]
    style = [torch.full((2, 2), 1.0)] * 5
    # ratios 1, 2, 1, 2, 30: mean 7.2; 30 is not below 3 × 7.2, so γ is the mean of the other four
    assert magnitude_ratio(content, style) == pytest.approx(1.5)
    assert magnitude_ratio(content[:3], style[:3]) == pytest.approx(4 / 3)
    assert style_scale(0.0, 1.5, 1.275, "s*") == pytest.approx(1.275)
    assert style_scale(0.5, 1.5, 1.275, "s*") == pytest.approx((0.75 + 1.275) % 1.5)
    assert style_scale(0.5, 1.5, 0.5, "a*") == pytest.approx(1.25)


def _entries(tiny_loras):
    return [LoraEntry(file=str(tiny_loras["alpha"]), role="concept", trigger_words=["sks"]),
            LoraEntry(file=str(tiny_loras["gamma"]), role="style")]


def test_each_layer_applies_exactly_one_lora_at_each_step_and_is_left_as_it_was(tiny_pipe, tiny_loras, monkeypatch):
    from composers.k_lora import KLoraComposer
    from studio.lora.inject import lora_layers

    seen = []
    real_predict = KLoraComposer.predict

    def spy(self, session, latents, step, t):
        out = real_predict(self, session, latents, step, t)
        seen.append({name: layer.active_adapters() for name, layer in self.layers.items()})
        return out

    monkeypatch.setattr(KLoraComposer, "predict", spy)
    result = compose(tiny_pipe, Composition(prompt=PROMPT, steps=3, seed=0, method="k_lora", loras=_entries(tiny_loras)))
    assert len(seen) == 3 and seen[0]
    assert all(len(active) == 1 for step in seen for active in step.values())
    assert len(result.info["content_share_per_step"]) == 3
    assert not lora_layers(tiny_pipe)


def test_k_lora_wants_one_content_and_one_style_lora(tiny_pipe, tiny_loras):
    two_concepts = [LoraEntry(file=str(tiny_loras["alpha"]), role="concept"),
                    LoraEntry(file=str(tiny_loras["beta"]), role="concept")]
    with pytest.raises(PresetError, match="one content LoRA .* and one style LoRA"):
        compose(tiny_pipe, Composition(prompt=PROMPT, steps=2, method="k_lora", loras=two_concepts))
