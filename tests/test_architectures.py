"""SD1.5- and SDXL-shaped pipelines from their public configs, random weights, small sample sizes."""
import torch

from studio.models import choose_placement, load_base_model, model_family


def _one_step(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, guidance_scale=5.0,
               output_type="latent", generator=generator, **kwargs).images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    return out


def test_sd15_shaped_pipeline_saves_loads_places_and_steps(sd15_pipe, tmp_path):
    assert model_family(sd15_pipe) == "SD1.x"
    assert sum(p.numel() for p in sd15_pipe.unet.parameters()) == 859_520_964
    sd15_pipe.save_pretrained(tmp_path / "sd15")
    loaded = load_base_model(tmp_path / "sd15")
    placement = choose_placement()
    assert loaded.device.type == placement.device and loaded.unet.dtype == placement.dtype
    assert torch.equal(_one_step(loaded), _one_step(sd15_pipe))
