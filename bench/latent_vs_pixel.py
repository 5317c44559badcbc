"""Why the bundled model works on 32×32×4 latents: seconds per training step (batch 32, forward + backward +
AdamW) of its UNet on latents against the same UNet in 64×64 pixel space, measured in this run.
Usage: studio bench latent_vs_pixel [--batch 32] [--steps 3]"""
from __future__ import annotations

import argparse
import time

import torch


def seconds_per_step(unet, size: int, channels: int, batch: int, steps: int) -> float:
    from studio.toyworld.model import TEXT_HIDDEN

    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, text = torch.randn(batch, channels, size, size), torch.randn(batch, 77, TEXT_HIDDEN)
    t = torch.randint(0, 1000, (batch,))
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            start = time.perf_counter()
        unet(x, t, text).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    from diffusers import UNet2DConditionModel

    from studio.toyworld.model import build_unet

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    latent = build_unet()
    pixel = UNet2DConditionModel(**{**latent.config, "sample_size": 64, "in_channels": 3, "out_channels": 3})
    a = seconds_per_step(latent, 32, 4, args.batch, args.steps)
    b = seconds_per_step(pixel, 64, 3, args.batch, args.steps)
    print(f"UNet training step, batch {args.batch}, {torch.get_num_threads()} threads: "
          f"32×32×4 latents {a:.2f} s, 64×64 pixels {b:.2f} s, ratio {b / a:.1f}×")


if __name__ == "__main__":
    main()
