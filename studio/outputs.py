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
