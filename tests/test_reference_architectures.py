"""Every composition method on SD1.5- and SDXL-shaped pipelines (public configs, random weights, 64 px):
the real layer names, token grids and text encoders, without downloads."""
import torch

from studio.compose import compose
from studio.spec import Composition, LoraEntry, Region

PROMPT = "a photo of a sks dog and a ohwx cat"


def test_sdxl_shaped_pipeline_places_and_steps(sdxl_pipe):
    from studio.models import model_family

    assert model_family(sdxl_pipe) == "SDXL"
    assert sum(p.numel() for p in sdxl_pipe.unet.parameters()) == 2_567_463_684
    assert sdxl_pipe.device.type == "cpu" and sdxl_pipe.unet.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    out = sdxl_pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, guidance_scale=5.0,
                    output_type="latent", generator=generator).images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def _entries(folder, pipe, base):
    from studio.lora.synthetic import write_random_lora

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


def test_every_method_on_sdxl_shaped_pipeline(sdxl_pipe, tmp_path):
    _run_every_method(sdxl_pipe, _entries(tmp_path, sdxl_pipe, "sdxl_base_v1-0"))


def test_decor_projects_each_sdxl_encoder_block_separately(sdxl_pipe):
    from studio.decor import decor_bases, decor_transform
    from studio.engine import encode

    bases = decor_bases(sdxl_pipe, ["cat"])
    assert [b.shape[0] for _, b in bases] == [768, 1280]
    cond = encode(sdxl_pipe, [PROMPT], [""], 64, 64)
    out = decor_transform(sdxl_pipe, ["cat"], 1.0)(cond, True)
    for features, basis in bases:
        assert (out.embeds[1:, :, features] @ basis).abs().max() < 1e-3
    assert torch.equal(out.added["text_embeds"], cond.added["text_embeds"])  # pooled untouched


def test_b4m_fused_checkpoint_with_old_keys_loads_as_an_ordinary_lora(sdxl_pipe, tmp_path):
    """B4M's published checkpoints: SDXL, diffusers-0.22 keys `unet.unet.<block>.to_q.lora.down.weight`."""
    from safetensors.torch import save_file

    from studio.lora import attach_lora, detach_lora, inspect_lora, load_lora

    projections = [name for name, module in sdxl_pipe.unet.named_modules()
                   if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and isinstance(module, torch.nn.Linear)]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in projections:
        layer = sdxl_pipe.unet.get_submodule(name)
        state[f"unet.unet.{name}.lora.down.weight"] = torch.randn(4, layer.in_features, generator=gen) * 0.01
        state[f"unet.unet.{name}.lora.up.weight"] = torch.randn(layer.out_features, 4, generator=gen) * 0.01
    path = tmp_path / "b4m_fused.safetensors"
    save_file(state, str(path))
    info = inspect_lora(path)
    assert (info.base_model, info.modules) == ("SDXL", len(projections)) and len(projections) == 560
    weights = load_lora(path)
    assert {target for _, target in weights.modules} == set(projections)
    injected = attach_lora(sdxl_pipe, weights, "b4m")
    try:
        assert injected == sum(t.numel() for t in state.values())
    finally:
        detach_lora(sdxl_pipe, "b4m")
