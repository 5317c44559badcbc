import torch

from attention.controller import CompositionController, CrossContext
from attention.processors import StudioAttnProcessor
from studio.compose import compose
from studio.spec import Composition, LoraEntry, Region
from tests.helpers import CONCEPT_PROMPT as PROMPT
from tests.helpers import plain_latents, spec


def test_full_mask_regional_equals_plain_single_lora(tiny_pipe, tiny_loras):
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora

    weights = load_lora(tiny_loras["alpha"])
    attach_lora(tiny_pipe, weights, "solo", 0.8)
    try:
        expected = plain_latents(tiny_pipe, PROMPT)
    finally:
        detach_lora(tiny_pipe, "solo")
    entry = LoraEntry(file=str(tiny_loras["alpha"]), weight=0.8, trigger_words=["sks"],
                      region=Region(box=(0, 0, 1, 1)), prompt=PROMPT)
    result = compose(tiny_pipe, spec("regional", [entry]))
    assert (result.latents - expected).abs().max() < 1e-5


def test_half_masks_mix_single_lora_outputs_per_token_in_every_lora_layer(tiny_pipe, tiny_loras):
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora, lora_layers, only_adapters

    attach_lora(tiny_pipe, load_lora(tiny_loras["alpha"]), "a", 1.0)
    attach_lora(tiny_pipe, load_lora(tiny_loras["beta"]), "b", 1.0)
    try:
        ctrl = CompositionController((8, 12))
        left = torch.zeros(8, 12)
        left[:, :6] = 1.0
        ctrl.adapter_regions = {"a": left, "b": 1.0 - left}
        checked = 0
        for name, layer in lora_layers(tiny_pipe).items():
            if not name.startswith("unet.") or name.endswith((".attn2.to_k", ".attn2.to_v")):
                continue
            base = layer.base
            if isinstance(base, torch.nn.Conv2d):
                rows, cols = (8, 12) if "up_blocks.3" in name or "down_blocks.0" in name else (4, 6)
                x = torch.randn(2, base.in_channels, rows, cols)
                mask = ctrl.region_at("a", rows, cols)[None, None]
            else:
                n = 4 * 6
                x = torch.randn(2, n, base.in_features)
                mask = ctrl.region_at("a", 4, 6).reshape(1, n, 1)
            with only_adapters([layer], ["a"]):
                out_a = layer(x)
            with only_adapters([layer], ["b"]):
                out_b = layer(x)
            layer.gate = lambda adapter, delta, _n=layer.name: ctrl.lora_gate(_n, adapter, delta)
            mixed = layer(x)
            layer.gate = None
            assert torch.allclose(mixed, mask * out_a + (1 - mask) * out_b, atol=1e-5), name
            checked += 1
        assert checked > 10
    finally:
        detach_lora(tiny_pipe, "a")
        detach_lora(tiny_pipe, "b")


def test_cross_attention_blends_region_contexts_per_token(tiny_pipe):
    attn = tiny_pipe.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn2
    hidden = torch.randn(2, 4 * 6, attn.to_q.in_features)
    ctx_a, ctx_b = torch.randn(2, 77, 128), torch.randn(2, 77, 128)
    left = torch.zeros(8, 12)
    left[:, :6] = 1.0

    def run(contexts):
        ctrl = CompositionController((8, 12), contexts=contexts)
        return StudioAttnProcessor("x", ctrl)(attn, hidden, encoder_hidden_states=ctx_a)

    only_a = run([CrossContext("global", ctx_a)])
    only_b = run([CrossContext("global", ctx_b)])
    mixed = run([CrossContext("global", ctx_a), CrossContext("b", ctx_b, mask=1.0 - left)])
    weight = (1.0 - left)[::2, ::2].reshape(1, -1, 1)
    assert torch.allclose(mixed, weight * only_b + (1 - weight) * only_a, atol=1e-5)


def test_regional_lora_acts_inside_its_box_on_a_non_square_image(tiny_pipe, tiny_loras):
    entry = LoraEntry(file=str(tiny_loras["alpha"]), weight=2.0, trigger_words=["sks"],
                      region=Region(box=(0.0, 0.0, 0.375, 1.0)))
    without = compose(tiny_pipe, spec("regional", steps=1, width=128, height=192)).latents
    with_lora = compose(tiny_pipe, spec("regional", [entry], steps=1, width=128, height=192)).latents
    assert with_lora.shape[-2:] == (96, 64)
    change = (with_lora - without).abs().mean(1)[0]
    inside, outside = change[:, :24].mean(), change[:, 32:].mean()
    assert inside > 3 * outside, (float(inside), float(outside))



def test_auto_regions_place_each_concept_where_its_trigger_attends_then_compose_in_one_pass(tiny_pipe, tiny_loras):
    from studio.compose import compose
    from studio.lora.inject import lora_layers

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["shape"], region=Region(auto=True),
                         prompt="a large solid red shape on the left, white background"),
               LoraEntry(file=str(tiny_loras["beta"]), trigger_words=["shape"], region=Region(auto=True),
                         prompt="a large solid blue shape on the right, white background")]
    composition = Composition(prompt="a large solid red shape on the left and a large solid blue shape on the right",
                              steps=4, guidance=5.0, seed=0, method="regional", loras=entries,
                              params={"auto_steps": 2})
    result = compose(tiny_pipe, composition)
    assert len(result.masks) == 2
    first, second = result.masks.values()
    assert not bool((first * second).any())  # each place goes to one concept only
    assert not lora_layers(tiny_pipe)


def test_an_auto_region_needs_its_trigger_in_the_prompt_and_a_box_method_refuses_it(tiny_pipe, tiny_loras):
    import pytest

    from studio.compose import compose
    from studio.errors import PresetError

    entry = LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(auto=True))
    with pytest.raises(PresetError, match="follows the concept's trigger words"):
        compose(tiny_pipe, Composition(prompt="a red circle", steps=2, method="regional", loras=[entry]))
    with pytest.raises(PresetError, match="use the regional method"):
        compose(tiny_pipe, Composition(prompt="a red sks", steps=2, method="lora_composer", loras=[entry]))
    with pytest.raises(ValueError, match="exactly one of"):
        Region(auto=True, box=(0, 0, 1, 1))


def test_cached_keys_and_region_only_cross_attention_compute_what_every_query_and_step_would(tiny_pipe, tiny_loras,
                                                                                              monkeypatch):
    entries = [LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)),
                         prompt=PROMPT),
               LoraEntry(file=str(tiny_loras["beta"]), trigger_words=["ohwx"], region=Region(box=(0.5, 0.25, 1, 1)),
                         prompt=PROMPT.replace("sks", "ohwx"))]
    for method in ("regional", "lora_composer"):
        fast = compose(tiny_pipe, spec(method, entries))
        with monkeypatch.context() as patched:  # every context over every query, keys and values every call
            patched.setattr(CompositionController, "context_support",
                            lambda self, rows, cols: [None] * len(self.contexts))
            patched.setattr(CompositionController, "cross_kv_key", staticmethod(lambda layer, context: None))
            naive = compose(tiny_pipe, spec(method, entries))
        assert (fast.latents - naive.latents).abs().max() < 1e-3 * naive.latents.abs().max(), method  # rounding only


def test_a_context_is_attended_only_where_it_is_blended(tiny_pipe):
    ctrl = CompositionController((8, 8))
    box = torch.zeros(8, 8)
    box[:, :4] = 1.0
    ctrl.contexts = [CrossContext("global", torch.zeros(1, 77, 8), None),
                     CrossContext("left", torch.zeros(1, 77, 8), box)]
    background, left = ctrl.context_support(8, 8)
    assert background.tolist() == [r * 8 + c for r in range(8) for c in range(4, 8)]
    assert left.tolist() == [r * 8 + c for r in range(8) for c in range(4)]
    everywhere = CompositionController((8, 8))
    everywhere.contexts = [ctrl.contexts[0], CrossContext("all", torch.zeros(1, 77, 8), torch.ones(8, 8))]
    assert everywhere.context_support(8, 8)[1] is None  # the whole image: no indexing at all
