"""What one-pass regional LoRA costs against one pass per LoRA (docs/methods.md §1), on an SD1.5-shaped UNet.

Prints seconds per denoising step (CFG batch 2) and the ratios, all measured in this run:
plain (no LoRA), 1 LoRA (merge), 2 LoRAs regional in one pass, 2 LoRAs as two separate passes.
Usage: studio bench regional_cost [--size 256] [--steps 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def seconds_per_step(pipe, composition, steps: int) -> float:
    from studio.compose import compose

    times = []

    def tick(info):
        times.append(time.perf_counter())

    start = time.perf_counter()
    compose(pipe, composition.model_copy(update={"steps": steps}), callback=tick)
    deltas = [b - a for a, b in zip([start] + times[:-1], times)]
    return statistics.median(deltas[1:] if len(deltas) > 1 else deltas)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    from studio.architectures import random_sd15_pipeline
    from studio.lora.synthetic import write_random_lora
    from studio.spec import Composition, LoraEntry, Region

    torch.set_grad_enabled(False)
    pipe = random_sd15_pipeline()
    folder = Path(tempfile.mkdtemp())
    a = write_random_lora(folder / "a.safetensors", pipe, "sd_v1", rank=8, seed=1, trigger="sks")
    b = write_random_lora(folder / "b.safetensors", pipe, "sd_v1", rank=8, seed=2, trigger="ohwx")
    base = Composition(prompt="a photo of a sks dog and a ohwx cat", width=args.size, height=args.size, guidance=7.0)
    left = LoraEntry(file=str(a), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1)))
    right = LoraEntry(file=str(b), trigger_words=["ohwx"], region=Region(box=(0.5, 0, 1, 1)))
    runs = {
        "plain": base.model_copy(update={"method": "merge"}),
        "one_lora": base.model_copy(update={"method": "merge", "loras": [LoraEntry(file=str(a))]}),
        "two_regional_one_pass": base.model_copy(update={"method": "regional", "loras": [left, right]}),
        # one full pass per LoRA, as A1111 Regional Prompter's latent mode and ComfyUI's hook LoRAs do
        "two_separate_passes": base.model_copy(update={"method": "composite", "params": {"batched": False},
                                                       "loras": [LoraEntry(file=str(a)), LoraEntry(file=str(b))]}),
    }
    results = {name: seconds_per_step(pipe, c, args.steps) for name, c in runs.items()}
    print(f"SD1.5-shaped UNet, {args.size} px, CFG batch 2, {torch.get_num_threads()} threads: seconds per step")
    for name, value in results.items():
        print(f"  {name:24s} {value:7.2f}")
    print(f"  regional one pass / one LoRA      = {results['two_regional_one_pass'] / results['one_lora']:.2f}")
    print(f"  regional one pass / two passes    = {results['two_regional_one_pass'] / results['two_separate_passes']:.2f}")


if __name__ == "__main__":
    main()
