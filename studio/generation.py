"""Plain text-to-image generation on a loaded pipeline, with the PNG metadata other tools read."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from PIL import Image, PngImagePlugin


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    width: int | None = None
    height: int | None = None


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate_plain(pipe, settings: GenerationSettings, callback=None) -> Image.Image:
    size = default_size(pipe)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    result = pipe(settings.prompt, negative_prompt=settings.negative_prompt or None,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                  width=settings.width or size, height=settings.height or size, generator=generator,
                  callback_on_step_end=callback)
    return result.images[0]


def a1111_parameters(settings: GenerationSettings, width: int, height: int, model_name: str = "",
                     model_hash: str = "", lora_hashes: dict[str, str] | None = None, sampler: str = "DDIM") -> str:
    """The `parameters` text chunk that A1111, Civitai and others read."""
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    fields = [f"Steps: {settings.steps}", f"Sampler: {sampler}", f"CFG scale: {settings.guidance:g}",
              f"Seed: {settings.seed}", f"Size: {width}x{height}"]
    if model_hash:
        fields.append(f"Model hash: {model_hash}")
    if model_name:
        fields.append(f"Model: {model_name}")
    if lora_hashes:
        fields.append('Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in lora_hashes.items()) + '"')
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_info(parameters: str, preset: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    if preset is not None:
        info.add_text("lora-studio", json.dumps(preset))
    return info
