import pytest
import torch

from studio.compose import compose, prepared_session
from studio.errors import PresetError
from studio.spec import Composition, LoraEntry, Region

PROMPT = "a large solid red sks on the left and a small solid blue ohwx on the right, white background"
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75)


def spec(loras, steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method="latent_couple", loras=list(loras),
                       **kw)


def _entries(tiny_loras):
    return [LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(box=LEFT),
                      prompt="a large solid red sks on the left, white background"),
            LoraEntry(file=str(tiny_loras["beta"]), trigger_words=["ohwx"], region=Region(box=RIGHT),
                      prompt="a small solid blue ohwx on the right, white background"),
            LoraEntry(file=str(tiny_loras["gamma"]), role="style")]


def test_each_region_takes_its_own_pass_and_the_rest_the_global_pass(tiny_pipe, tiny_loras):
    """The batched, gated call equals one ordinary pass per region (its LoRA and the style, its region prompt) and
    one global pass (the style only), blended box by box, then guided."""
    from studio.engine import unet_pass
    from studio.lora.inject import only_adapters

    with prepared_session(tiny_pipe, spec(_entries(tiny_loras))) as (session, composer):
        tiny_pipe.scheduler.set_timesteps(3)
        t = tiny_pipe.scheduler.timesteps[0]
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        fused = composer.predict(session, latents, 0, t)
        assert composer.passes(session) == 3.0
        names = list(session.adapters)
        reference = {}
        plain = {"contexts": [], "adapter_regions": {}, "adapter_batch_rows": {}, "isolate_concepts": False}
        for key, active, prompt in ((None, [names[2]], PROMPT),
                                    (names[0], [names[0], names[2]], session.adapters[names[0]].prompt),
                                    (names[1], [names[1], names[2]], session.adapters[names[1]].prompt)):
            with session.controller.override(**plain), only_adapters(tiny_pipe, active):  # ordinary passes
                conditioning = session.encode([prompt], [""], text_adapters=active)
                out = unet_pass(tiny_pipe, torch.cat([latents, latents]), t, conditioning)
            reference[key] = out[:1] + 5.0 * (out[1:] - out[:1])
    expected = reference[None].clone()
    expected[..., :, :16] = reference[names[0]][..., :, :16]  # left half: the first LoRA's pass
    expected[..., 8:24, 16:] = reference[names[1]][..., 8:24, 16:]  # the right box: the second's
    assert torch.allclose(fused, expected, atol=1e-4)


def test_masks_are_returned_and_layers_left_ungated(tiny_pipe, tiny_loras):
    from studio.lora.inject import lora_layers

    result = compose(tiny_pipe, spec(_entries(tiny_loras), steps=2))
    assert result.info["unet_passes_per_step"] == 3.0
    assert not lora_layers(tiny_pipe)


def test_regions_placed_automatically_are_refused_in_one_sentence(tiny_pipe, tiny_loras):
    entries = _entries(tiny_loras)
    entries[0] = entries[0].model_copy(update={"region": Region(auto=True)})
    with pytest.raises(PresetError, match="placed automatically use the regional method"):
        compose(tiny_pipe, spec(entries, steps=2))


def test_the_last_steps_can_run_as_the_one_pass_regional_method(tiny_pipe, tiny_loras):
    """couple_until = 0.5 of 4 steps: 2 steps of 3 passes, then 2 of 1; couple_until = 0 is the regional method."""
    half = compose(tiny_pipe, spec(_entries(tiny_loras), steps=4, params={"couple_until": 0.5}))
    assert half.info["unet_passes_per_step"] == 2.0
    none = compose(tiny_pipe, spec(_entries(tiny_loras), steps=4, params={"couple_until": 0.0})).latents
    regional = compose(tiny_pipe, spec(_entries(tiny_loras), steps=4).model_copy(update={"method": "regional"})).latents
    assert torch.allclose(none, regional, atol=1e-5)
