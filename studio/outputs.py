"""Writing a result: the image as PNG (A1111 `parameters` chunk + the lossless preset chunk) and, beside
it, each concept's attention map and mask as PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.files import png_bytes, write_bytes_atomic


def tensor_to_png(values: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (rows, cols) map in [0, 1] as a greyscale image of `size` (nearest, so cells stay visible)."""
    array = (values.float().clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").resize(size, Image.Resampling.NEAREST)


def result_files(result, stem: str, maps: bool = True) -> dict[str, bytes]:
    """A result's files by name, the image first (A1111 `parameters` + the portable composition), then each
    concept's attention map and mask: the same bytes whichever engine made them."""
    files = {f"{stem}.png": result.png_bytes()}
    if maps:
        for kind, items in (("map", result.maps), ("mask", result.masks)):
            for name, values in items.items():
                files[f"{stem}-{name}-{kind}.png"] = png_bytes(tensor_to_png(values, result.image.size))
    return files


def write_files(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write a result's files atomically, the image (the first) last, so that a file present is whole and an
    image present has its maps; returns the paths, the image first."""
    names = list(files)
    for name in names[1:] + names[:1]:
        write_bytes_atomic(Path(out_dir) / name, files[name])
    return [Path(out_dir) / name for name in names]


def write_result(result, out_dir: Path, stem: str, maps: bool = True) -> list[Path]:
    """The image as `<stem>.png` and, beside it, each concept's attention map and mask."""
    return write_files(out_dir, result_files(result, stem, maps))


def a1111_infotext(result) -> str:
    """The `parameters` text A1111 would write for this image: the prompt with a `<lora:name:weight>` tag per
    LoRA (so that A1111's "send to txt2img" restores them), the sampler that ran, the model's name and hash, and
    each LoRA's short hash."""
    from studio.a1111 import A1111_SAMPLERS, GenerationParameters, lora_tag

    composition = result.composition
    tags = [lora_tag(Path(entry.file).stem, entry.weight if entry.text_encoder_weight is None
                     else entry.text_encoder_weight, entry.weight) for entry in composition.loras]
    prompt = " ".join([composition.prompt, *tags]) if tags else composition.prompt
    sampler = composition.scheduler or result.info.get("sampler", "DDIM")
    hashes = {Path(lora["file"]).stem: lora["short_hash"] for lora in result.info.get("loras", {}).values()
              if lora.get("short_hash")}
    return GenerationParameters(
        prompt=prompt, negative_prompt=composition.negative_prompt, steps=composition.steps,
        sampler=sampler, schedule_type=None if sampler in A1111_SAMPLERS else "Automatic",  # e.g. DDPM: not in A1111
        cfg_scale=composition.guidance,
        seed=composition.seed, width=result.image.width, height=result.image.height,
        model_hash=result.model_hash or None, model=result.model_name or None, lora_hashes=hashes).infotext()


CONCEPT_COLOURS = ((230, 60, 60), (50, 130, 240), (40, 190, 90), (240, 170, 30), (170, 80, 220), (30, 200, 200))


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The cells of a boolean mask within `width` cells of its edge (4-neighbourhood), to draw it as an outline."""
    inner = mask.copy()
    for step in range(1, width + 1):
        for axis, shift in ((0, step), (0, -step), (1, step), (1, -step)):
            inner &= np.roll(mask, shift, axis=axis)
    return mask & ~inner


def overview(result, scale: int = 4) -> Image.Image:
    """The image enlarged (nearest, so small models' pixels stay sharp) with each concept's region outlined in its
    colour, then, per concept, the image with its attention map laid over it in that colour: why an image came out
    as it did, at a glance."""
    image = result.image.convert("RGB")
    size = (image.width * scale, image.height * scale)
    base = np.asarray(image.resize(size, Image.Resampling.NEAREST), np.float32)
    outlined = base.copy()
    panels = []
    for k, name in enumerate(dict.fromkeys([*result.masks, *result.maps])):
        colour = np.asarray(CONCEPT_COLOURS[k % len(CONCEPT_COLOURS)], np.float32)
        if name in result.masks:
            mask = np.asarray(tensor_to_png(result.masks[name], size), np.float32) > 127
            outlined[mask_outline(mask)] = colour
        if name in result.maps:
            weight = np.asarray(tensor_to_png(result.maps[name], size), np.float32)[..., None] / 255.0 * 0.7
            panels.append(base * (1 - weight) + colour * weight)
    gap = np.full((size[1], 2 * scale, 3), 255, np.float32)
    row = [outlined]
    for panel in panels:
        row += [gap, panel]
    return Image.fromarray(np.concatenate(row, axis=1).clip(0, 255).astype(np.uint8))
