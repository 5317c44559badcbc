"""One sampler loop shared by every composition method (k-diffusion style: plain functions over tensors),
with hooks for guidance steps, noise fusion and a per-step callback (progress, preview, cancel)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from attention.controller import CompositionController
from studio.errors import Cancelled


@dataclass
class Conditioning:
    """UNet text conditioning for a batch: embeddings (B, tokens, dim), plus SDXL's pooled embeddings and
    time ids."""
    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def rows(self, index) -> "Conditioning":
        added = None if self.added is None else {k: v[index] for k, v in self.added.items()}
        return Conditioning(self.embeds[index], added)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.embeds for p in parts]), added)


@dataclass
class StepInfo:
    step: int
    total: int
    latents: torch.Tensor
    elapsed: float


@dataclass
class ComposeResult:
    image: Image.Image
    latents: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # concept -> (rows, cols) in [0, 1]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # concept -> (rows, cols) in [0, 1]
    info: dict = field(default_factory=dict)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def encode(pipe, prompts: list[str], negatives: list[str] | None, height: int, width: int) -> Conditioning:
    """Encode prompts exactly as the pipeline's own __call__ does; returns conditioning rows
    [negatives..., prompts...] when negatives are given (classifier-free guidance), else [prompts...]."""
    device = pipe._execution_device
    cfg = negatives is not None
    negative = None if not cfg or all(n == "" for n in negatives) else negatives
    if not is_sdxl(pipe):
        pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, negative)
        return Conditioning(torch.cat([neg, pos]) if cfg else pos)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=cfg, negative_prompt=negative)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.to(device).repeat(len(prompts), 1)
    if cfg:
        return Conditioning(torch.cat([neg, pos]), {"text_embeds": torch.cat([neg_pooled, pooled]),
                                                    "time_ids": torch.cat([time_ids, time_ids])})
    return Conditioning(pos, {"text_embeds": pooled, "time_ids": time_ids})


def unet_pass(pipe, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
    x = pipe.scheduler.scale_model_input(latents, t)
    return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added, return_dict=False)[0]


class _LayersDone(Exception):
    """Raised by unet_pass_until's hooks to leave the UNet once the layers it waits for have run."""


def unet_pass_until(pipe, latents: torch.Tensor, t, cond: Conditioning, layers: set[str]) -> None:
    """A UNet call that stops as soon as every module named in `layers` has run: guidance reads attention maps of a
    few layers, and the rest of the UNet (SD1.5: the two finest up blocks) is not needed for
    them, nor kept for a backward pass. The maps land where the processors record them; nothing is returned."""
    unet = pipe.unet
    remaining = set(layers)

    def finished(name):
        def hook(_module, _args, _output):
            remaining.discard(name)
            if not remaining:
                raise _LayersDone

        return hook

    handles = [unet.get_submodule(name).register_forward_hook(finished(name)) for name in layers]
    try:
        unet_pass(pipe, latents, t, cond)
    except _LayersDone:
        pass
    finally:
        for handle in handles:
            handle.remove()


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def initial_latents(pipe, height: int, width: int, generator: torch.Generator, dtype) -> torch.Tensor:
    return pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, dtype, pipe._execution_device,
                                generator)


def decode(pipe, latents: torch.Tensor) -> Image.Image:
    vae = pipe.vae
    needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if needs_upcast:
        vae = vae.to(torch.float32)
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    if needs_upcast:
        vae.to(torch.float16)
    return pipe.image_processor.postprocess(image.detach(), output_type="pil")[0]


def sample(session, composer, callback: Callable[[StepInfo], bool | None] | None = None) -> ComposeResult:
    """The loop: (optional) latent re-initialisation, then per step: guidance on the latents, the method's
    prediction (its UNet passes and noise fusion), the scheduler step, the callback (return False to cancel)."""
    pipe = session.pipe
    scheduler = pipe.scheduler
    scheduler.set_timesteps(session.steps, device=pipe._execution_device)
    timesteps = scheduler.timesteps
    latents = initial_latents(pipe, session.height, session.width, session.generator, session.dtype)
    extra = pipe.prepare_extra_step_kwargs(session.generator, 0.0)
    start = time.perf_counter()
    latents = composer.before_sampling(session, latents)
    for i, t in enumerate(timesteps):
        session.controller.reset_step(i)
        latents = composer.guide(session, latents, i, t)
        with torch.no_grad():
            prediction = composer.predict(session, latents, i, t)
        latents = scheduler.step(prediction, t, latents, **extra, return_dict=False)[0]
        if callback is not None and callback(StepInfo(i, len(timesteps), latents, time.perf_counter() - start)) is False:
            raise Cancelled(f"Generation was cancelled at step {i + 1} of {len(timesteps)}; nothing was changed.")
    maps, masks = composer.maps_and_masks(session)
    image = decode(pipe, latents)
    return ComposeResult(image, latents, maps, masks,
                         {"seconds": time.perf_counter() - start, "unet_passes_per_step": composer.passes(session)})


@dataclass
class Session:
    """Per-generation inputs the composers read: the pipeline, the sizes, the seed, the controller, the
    attached LoRAs (adapter name -> spec entry) and the encoded prompts."""
    pipe: object
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    generator: torch.Generator
    controller: CompositionController
    adapters: dict = field(default_factory=dict)  # adapter name -> LoraEntry
    loras: dict = field(default_factory=dict)  # adapter name -> LoraWeights
    embedding_transform: Callable[[Conditioning, bool], Conditioning] | None = None  # DECOR, once per prompt
    adapter_transforms: dict = field(default_factory=dict)  # adapter -> per-LoRA DECOR transform

    @property
    def dtype(self):
        return self.pipe.unet.dtype

    @property
    def do_cfg(self) -> bool:
        return self.guidance > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    @property
    def latent_size(self) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor
        return self.height // factor, self.width // factor

    def encode(self, prompts: list[str], negatives: list[str] | None, text_adapters: list[str] | None = None
               ) -> Conditioning:
        """Encode with only `text_adapters` active in the text encoders (None: as attached)."""
        from studio.lora.inject import only_adapters, text_encoder_layers

        with only_adapters(text_encoder_layers(self.pipe), text_adapters):
            cond = encode(self.pipe, prompts, negatives if self.do_cfg else None, self.height, self.width)
        active = self.adapters if text_adapters is None else text_adapters
        transforms = [self.embedding_transform] + [self.adapter_transforms.get(name) for name in active]
        for transform in filter(None, transforms):
            cond = transform(cond, self.do_cfg)
        return cond

    def concepts(self) -> dict:
        return {name: entry for name, entry in self.adapters.items() if entry.role == "concept"}

    def styles(self) -> dict:
        return {name: entry for name, entry in self.adapters.items() if entry.role == "style"}
