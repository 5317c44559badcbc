"""Seconds to generate one 64×64 image in 20 steps with the bundled model on this machine (target ≤ 1 s),
median of 5 after one warm-up. Usage: studio bench default_model_speed"""
from __future__ import annotations

import statistics
import time

import torch


def main(argv=None):
    from studio.models import load_base_model

    pipe = load_base_model()
    prompt = "a large solid red circle on the left and a small striped blue star on the right, white background"
    times = []
    for i in range(6):
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
    print(f"bundled model, 64×64, 20 steps, CFG, {torch.get_num_threads()} threads: "
          f"{statistics.median(times[1:]):.3f} s per image (median of 5)")


if __name__ == "__main__":
    main()
