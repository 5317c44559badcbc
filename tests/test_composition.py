"""The composition engine (issue 5) and the baselines (issue 6) on a tiny pipeline of the shapes-world
architecture: exactness of the regional mechanism, the plain-output guarantee, masks on non-square
latents, token indices, LoRA-Composer's losses, CLoRA's NT-Xent."""
import pytest
import torch

from attention.controller import CompositionController, CrossContext
from attention.masks import box_mask, isolation_mask, token_grid
from attention.processors import StudioAttnProcessor
from attention.tokens import token_indices
from composers import registry
from studio.compose import compose
from studio.spec import Composition, LoraEntry, Region

PROMPT = "a large solid red sks on the left, white background"


def plain_latents(pipe, prompt, seed=0, steps=3, guidance=5.0, height=64, width=64):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=height,
                width=width, output_type="latent").images


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=kw.pop("prompt", PROMPT), steps=steps, guidance=5.0, seed=0, method=method,
                       loras=list(loras), **kw)


@pytest.mark.parametrize("method", sorted(registry()))
def test_without_loras_every_method_reproduces_plain_diffusers(tiny_pipe, method):
    expected = plain_latents(tiny_pipe, PROMPT)
    result = compose(tiny_pipe, spec(method))
    assert torch.allclose(result.latents, expected, atol=1e-5), (result.latents - expected).abs().max()


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


def test_token_grids_and_masks_stay_in_place_on_non_square_latents():
    ctrl = CompositionController((96, 64))
    box = (0.0, 0.0, 0.5, 0.25)  # left half, top quarter
    ctrl.adapter_regions = {"a": box_mask(box, 96, 64)}
    for rows, cols in ((96, 64), (48, 32), (24, 16), (12, 8)):
        assert token_grid(rows * cols, 96, 64) == (rows, cols)
        mask = ctrl.region_at("a", rows, cols)
        assert mask[: rows // 4, : cols // 2].min() == 1.0
        assert mask[rows // 4:].max() == 0.0 and mask[:, cols // 2:].max() == 0.0


def test_regional_lora_acts_inside_its_box_on_a_non_square_image(tiny_pipe, tiny_loras):
    entry = LoraEntry(file=str(tiny_loras["alpha"]), weight=2.0, trigger_words=["sks"],
                      region=Region(box=(0.0, 0.0, 0.375, 1.0)))
    without = compose(tiny_pipe, spec("regional", steps=1, width=128, height=192)).latents
    with_lora = compose(tiny_pipe, spec("regional", [entry], steps=1, width=128, height=192)).latents
    assert with_lora.shape[-2:] == (96, 64)
    change = (with_lora - without).abs().mean(1)[0]
    inside, outside = change[:, :24].mean(), change[:, 32:].mean()
    assert inside > 3 * outside, (float(inside), float(outside))


def test_token_indices_count_the_start_token_and_multi_token_words(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    assert token_indices(tokenizer, "a photo of a cat", ["cat"]) == [5]
    word = tokenizer("zorblaxian", add_special_tokens=False).input_ids
    assert len(word) > 1  # several BPE tokens
    positions = token_indices(tokenizer, "a zorblaxian dog", ["zorblaxian"])
    assert positions == list(range(2, 2 + len(word)))  # 0: start token, 1: "a"
    assert token_indices(tokenizer, "a cat", ["dog"]) == []


def test_isolation_mask_blocks_other_boxes_only():
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    a[:, :2] = 1
    b[:, 3:] = 1
    allowed = isolation_mask([a, b])  # tokens 0-1 / 4-5 in a, 3 / 7 in b, 2 / 6 background
    assert not allowed[0, 3] and not allowed[3, 0] and allowed[0, 1] and allowed[0, 2]
    assert allowed[2].all() and allowed[6].all()


def _maps(centre):
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 8.0)


def test_each_lora_composer_loss_prefers_a_box_centred_map():
    from composers.lora_composer import concept_enhancement_loss, fill_loss, region_restriction_loss

    box = box_mask((0.0, 0.25, 0.5, 0.75), 16, 16)  # rows 4-11, cols 0-7
    centred, off = _maps((7.5, 3.5)), _maps((7.5, 12.5))
    assert concept_enhancement_loss(centred, box) < concept_enhancement_loss(off, box)
    assert fill_loss(centred, box) < fill_loss(off, box)
    inside = box.flatten() > 0.5
    keys_in = torch.softmax(torch.where(inside, 4.0, 0.0).expand(256, 256), -1)
    keys_out = torch.softmax(torch.where(inside, 0.0, 4.0).expand(256, 256), -1)
    assert region_restriction_loss(keys_in, box) < region_restriction_loss(keys_out, box)


def test_nt_xent_falls_when_same_concept_maps_align():
    from composers.clora import nt_xent_loss

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    labels = torch.tensor([0, 0, 1, 1])
    noisy = torch.stack([a, torch.rand(64, generator=gen), b, torch.rand(64, generator=gen)])
    aligned = torch.stack([a, a + 0.01 * torch.rand(64, generator=gen), b, b + 0.01 * torch.rand(64, generator=gen)])
    assert nt_xent_loss(aligned, labels) < nt_xent_loss(noisy, labels)


@pytest.mark.parametrize("method", ["regional", "lora_composer", "clora"])
def test_methods_return_per_concept_maps_and_masks(tiny_pipe, tiny_loras, method):
    entries = [LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)),
                         prompt="a large solid red sks on the left, white background"),
               LoraEntry(file=str(tiny_loras["beta"]), trigger_words=["ohwx"], region=Region(box=(0.5, 0, 1, 1)),
                         prompt="a large solid blue ohwx on the right, white background")]
    params = {"guidance_steps": 2} if method == "lora_composer" else {"max_iter": 2, "inner_iters": 2} \
        if method == "clora" else {}
    result = compose(tiny_pipe, spec(method, entries, params=params,
                                     prompt="a large solid red sks on the left and a large solid blue ohwx on the right"))
    assert len(result.maps) == 2 and len(result.masks) == 2
    for values in list(result.maps.values()) + list(result.masks.values()):
        assert values.dim() == 2 and 0.0 <= float(values.min()) and float(values.max()) <= 1.0
    assert result.info["unet_passes_per_step"] >= 1.0
    from studio.lora.inject import lora_layers
    assert not lora_layers(tiny_pipe)  # everything detached afterwards


def test_composer_processors_are_restored(tiny_pipe, tiny_loras):
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    entry = LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)))
    compose(tiny_pipe, spec("lora_composer", [entry], params={"guidance_steps": 1}))
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before


def test_a_cancelled_run_says_so_and_leaves_the_pipeline_as_it_was(tiny_pipe, tiny_loras):
    from studio.errors import Cancelled
    from studio.lora.inject import lora_layers

    processors = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    entry = LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)))
    with pytest.raises(Cancelled) as info:
        compose(tiny_pipe, spec("lora_composer", [entry], steps=4), callback=lambda step: step.step < 1)
    assert str(info.value) == "Generation was cancelled at step 2 of 4; nothing was changed."
    assert not lora_layers(tiny_pipe)
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == processors
    assert torch.allclose(compose(tiny_pipe, spec("merge")).latents, plain_latents(tiny_pipe, PROMPT), atol=1e-5)


def test_a_bad_lora_among_good_ones_attaches_nothing(tiny_pipe, tiny_loras, tmp_path):
    from studio.errors import LoraError
    from studio.lora.inject import lora_layers

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    entries = [LoraEntry(file=str(tiny_loras["alpha"])), LoraEntry(file=str(bad))]
    with pytest.raises(LoraError) as info:
        compose(tiny_pipe, spec("merge", entries))
    assert "bad.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert not lora_layers(tiny_pipe)


def test_the_preset_scheduler_is_used_for_the_run_only(tiny_pipe):
    own = tiny_pipe.scheduler
    ddim = compose(tiny_pipe, spec("merge")).latents
    euler = compose(tiny_pipe, spec("merge", scheduler="euler")).latents
    assert tiny_pipe.scheduler is own and torch.isfinite(euler).all() and not torch.allclose(ddim, euler)
