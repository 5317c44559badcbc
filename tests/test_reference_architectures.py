"""Every composition method on SD1.5- and SDXL-shaped pipelines (public configs, random weights, 64 px):
the real layer names, token grids and text encoders, without downloads."""
import pytest
import torch

from studio.compose import compose
from studio.spec import Composition, LoraEntry, Region

PROMPT = "a photo of a sks dog and a ohwx cat"


def _entries(folder, pipe, base):
    from tests.lora_factory import write_random_lora

    dog = write_random_lora(folder / "dog.safetensors", pipe, base, rank=2, seed=1, trigger="sks")
    cat = write_random_lora(folder / "cat.safetensors", pipe, base, rank=2, seed=2, trigger="ohwx")
    return [LoraEntry(file=str(dog), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)),
                      prompt="a photo of a sks dog and a cat"),
            LoraEntry(file=str(cat), trigger_words=["ohwx"], region=Region(box=(0.5, 0, 1, 1)),
                      prompt="a photo of a dog and a ohwx cat")]


def _run_every_method(pipe, entries, width=64, height=64):
    params = {"lora_composer": {"guidance_steps": 1}, "clora": {"max_iter": 1, "inner_iters": 1}}
    results = {}
    for method in ("regional", "lora_composer", "clora", "merge", "switch", "composite"):
        composition = Composition(prompt=PROMPT, steps=1, guidance=5.0, seed=0, method=method, loras=entries,
                                  width=width, height=height, params=params.get(method, {}))
        result = compose(pipe, composition)
        assert torch.isfinite(result.latents).all(), method
        assert result.latents.shape[-2:] == (height // 8, width // 8)
        results[method] = result
    from studio.lora.inject import lora_layers

    assert not lora_layers(pipe)
    return results


def test_every_method_on_sd15_shaped_pipeline(sd15_pipe, tmp_path):
    results = _run_every_method(sd15_pipe, _entries(tmp_path, sd15_pipe, "sd_v1"), width=96, height=64)
    assert set(results["regional"].masks) == set(results["clora"].masks) and len(results["clora"].maps) == 2


@pytest.fixture(scope="module")
def sdxl(request):
    return request.getfixturevalue("sdxl_pipe")


def test_every_method_on_sdxl_shaped_pipeline(sdxl, tmp_path):
    _run_every_method(sdxl, _entries(tmp_path, sdxl, "sdxl_base_v1-0"))


def test_decor_projects_each_sdxl_encoder_block_separately(sdxl):
    from composers.decor import decor_bases, decor_transform
    from studio.engine import encode

    bases = decor_bases(sdxl, ["cat"])
    assert [b.shape[0] for _, b in bases] == [768, 1280]
    cond = encode(sdxl, [PROMPT], [""], 64, 64)
    out = decor_transform(sdxl, ["cat"], 1.0)(cond, True)
    for features, basis in bases:
        assert (out.embeds[1:, :, features] @ basis).abs().max() < 1e-3
    assert torch.equal(out.added["text_embeds"], cond.added["text_embeds"])  # pooled untouched
