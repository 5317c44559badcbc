"""One diffusion training step, shared by every trainer (the base model's, the LoRA trainer, B4M break and
make): noise and timesteps drawn from the step's generator, the noised latents, the target of the model's own
prediction type, the UNet's prediction and the loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def noised(noise_scheduler, latents: torch.Tensor, generator: torch.Generator):
    """(noisy latents, timesteps, target) of one step: noise, then one timestep per image, from `generator`."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    return noisy, t, target


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator,
                   added: dict | None = None, weights: torch.Tensor | None = None,
                   per_image: bool = False) -> torch.Tensor:
    """The mean squared error of the UNet's prediction (fp32). `weights` (B, 1, H, W): a weighted mean,
    normalised by the weights' mean; `per_image`: one value per image instead of the mean."""
    noisy, t, target = noised(noise_scheduler, latents, generator)
    pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.float()
    target = target.float()
    if per_image:
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    if weights is None:
        return F.mse_loss(pred, target)
    return ((pred - target) ** 2 * weights).mean() / weights.mean()
