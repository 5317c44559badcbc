import pytest
import torch

from attention.controller import CompositionController
from attention.masks import box_mask, token_grid
from attention.tokens import token_indices
from composers import registry
from studio.compose import compose
from studio.spec import LoraEntry, Region
from tests.helpers import CONCEPT_PROMPT as PROMPT
from tests.helpers import plain_latents, spec


@pytest.mark.parametrize("method", sorted(registry()))
def test_without_loras_every_method_reproduces_plain_diffusers(tiny_pipe, method):
    expected = plain_latents(tiny_pipe, PROMPT)
    result = compose(tiny_pipe, spec(method))
    assert torch.allclose(result.latents, expected, atol=1e-5), (result.latents - expected).abs().max()


def test_token_grids_and_masks_stay_in_place_on_non_square_latents():
    ctrl = CompositionController((96, 64))
    box = (0.0, 0.0, 0.5, 0.25)  # left half, top quarter
    ctrl.adapter_regions = {"a": box_mask(box, 96, 64)}
    for rows, cols in ((96, 64), (48, 32), (24, 16), (12, 8)):
        assert token_grid(rows * cols, 96, 64) == (rows, cols)
        mask = ctrl.region_at("a", rows, cols)
        assert mask[: rows // 4, : cols // 2].min() == 1.0
        assert mask[rows // 4:].max() == 0.0 and mask[:, cols // 2:].max() == 0.0


def test_token_indices_count_the_start_token_and_multi_token_words(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    assert token_indices(tokenizer, "a photo of a cat", ["cat"]) == [5]
    word = tokenizer("zorblaxian", add_special_tokens=False).input_ids
    assert len(word) > 1  # several BPE tokens
    positions = token_indices(tokenizer, "a zorblaxian dog", ["zorblaxian"])
    assert positions == list(range(2, 2 + len(word)))  # 0: start token, 1: "a"
    assert token_indices(tokenizer, "a cat", ["dog"]) == []


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

