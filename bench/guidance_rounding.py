"""Why LoRA-Composer's official-way reference can end on other latents than ours on SDXL although the maths is the
same: our guidance passes stop at the last map layer, the reference's run the whole UNet with explicit softmax
attention. This runs LoRA-Composer ours, ours with whole-UNet guidance passes, and the official way, on the speed
benchmark's composition, and prints how far their latents and guidance losses are apart.

Usage: studio bench guidance_rounding [--model sdxl|sd15] [--steps 1]
"""
from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="studio bench guidance_rounding")
    parser.add_argument("--model", default="sdxl", choices=["sd15", "sdxl", "shapes"])
    parser.add_argument("--steps", type=int, default=1, help="Steps after the first (all of them guided).")
    args = parser.parse_args(argv)
    import studio.engine as engine
    from speed_references import official_way
    from studio.compose import compose

    speed = runpy.run_path(str(ROOT / "bench" / "speed.py"), run_name="bench")
    pipe = speed["build_pipe"](args.model, "cpu", torch.float32)
    files, pair = speed["write_files"](pipe, args.model, Path(tempfile.mkdtemp()), 2)
    composition = speed["composition_for"]("lora_composer", 2, files, pair, 64 if args.model == "shapes" else 256,
                                           args.steps)

    def whole_unet(pipe_, latents, t, cond, _layers):
        engine.unet_pass(pipe_, latents, t, cond)

    ours = compose(pipe, composition)
    with mock.patch("composers.lora_composer.unet_pass_until", whole_unet):
        whole = compose(pipe, composition)
    with official_way("lora_composer"):
        official = compose(pipe, composition)

    def apart(a, b):
        return float((a.latents - b.latents).abs().max() / a.latents.abs().max())

    print(f"{args.model}, {args.steps + 1} guided steps, LoRA-Composer N = 2")
    print(f"  ours vs ours with whole-UNet guidance passes: latents {apart(ours, whole):.1e} apart (relative)")
    print(f"  that vs the official way (explicit softmax):  latents {apart(whole, official):.1e} apart (relative)")
    print(f"  guidance losses, ours:         {ours.info['guidance_losses']}")
    print(f"  guidance losses, official way: {official.info['guidance_losses']}")


if __name__ == "__main__":
    main(sys.argv[1:])
