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


def png_info(parameters: str, preset: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    if preset is not None:
        info.add_text("lora-studio", json.dumps(preset))
    return info
