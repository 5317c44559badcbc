"""Writing a result: the image as PNG (A1111 `parameters` chunk + the lossless preset chunk) and, beside
it, each concept's attention map and mask as PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.generation import GenerationSettings, a1111_parameters, png_info
from studio.spec import Composition


def tensor_to_png(values: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (rows, cols) map in [0, 1] as a greyscale image of `size` (nearest, so cells stay visible)."""
    array = (values.float().clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").resize(size, Image.Resampling.NEAREST)


def write_result(result, composition: Composition, out_dir: Path, stem: str = "image") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings(composition.prompt, composition.negative_prompt, composition.steps,
                                  composition.guidance, composition.seed)
    lora_hashes = {Path(lora["file"]).stem: lora["short_hash"] for lora in result.info.get("loras", {}).values()
                   if lora.get("short_hash")}
    parameters = a1111_parameters(settings, *result.image.size, model_name=composition.base_model or "shapes-world",
                                  lora_hashes=lora_hashes or None)
    image_path = out_dir / f"{stem}-{composition.method}-{composition.seed}.png"
    result.image.save(image_path, pnginfo=png_info(parameters, composition.model_dump(mode="json")))
    written = [image_path]
    for kind, items in (("map", result.maps), ("mask", result.masks)):
        for name, values in items.items():
            path = out_dir / f"{image_path.stem}-{name}-{kind}.png"
            tensor_to_png(values, result.image.size).save(path)
            written.append(path)
    return written


CONCEPT_COLOURS = ((230, 60, 60), (50, 130, 240), (40, 190, 90), (240, 170, 30), (170, 80, 220), (30, 200, 200))


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
            inner = mask.copy()
            for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
                inner &= np.roll(mask, shift, axis=axis)
            outlined[mask & ~inner] = colour
        if name in result.maps:
            weight = np.asarray(tensor_to_png(result.maps[name], size), np.float32)[..., None] / 255.0 * 0.7
            panels.append(base * (1 - weight) + colour * weight)
    gap = np.full((size[1], 2 * scale, 3), 255, np.float32)
    row = [outlined]
    for panel in panels:
        row += [gap, panel]
    return Image.fromarray(np.concatenate(row, axis=1).clip(0, 255).astype(np.uint8))
