"""Training images: the shapes world's rendered scenes and folders of your own images with their captions."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from studio.errors import StudioError


def render_batch(scenes, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    from studio.toyworld.render import image_to_tensor_array, render

    images = np.stack([image_to_tensor_array(render(s, rng.randrange(1 << 30))) for s in scenes])
    return torch.from_numpy(images), [s.caption() for s in scenes]


class ImageFolder:
    """A few images with their prompts: every .png/.jpg/.jpeg/.webp in a folder, its caption in a .txt
    file of the same name (the kohya convention), else `caption`; resized and centre-cropped to `size`."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, folder: Path, size: int, caption: str | None = None):
        if not Path(folder).is_dir():
            raise StudioError(f"{folder} is not a folder of images.")
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.SUFFIXES)
        if not self.files:
            raise StudioError(f"{folder} holds no images (.png, .jpg, .jpeg, .webp).")
        missing = [p.name for p in self.files if not p.with_suffix(".txt").exists()]
        if missing and caption is None:
            raise StudioError(f"{missing[0]} in {folder} has no caption file ({Path(missing[0]).stem}.txt) and no "
                              "default caption was given.")
        self.size, self.caption = size, caption

    def sample(self, rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
        from PIL import Image, ImageOps

        images, captions = [], []
        for path in (rng.choice(self.files) for _ in range(n)):
            image = ImageOps.fit(Image.open(path).convert("RGB"), (self.size, self.size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            images.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
            text = path.with_suffix(".txt")
            captions.append(text.read_text().strip() if text.exists() else self.caption)
        return torch.from_numpy(np.stack(images)), captions


def half_from_each(main: ImageFolder, others: list[ImageFolder]):
    """Batches of which half comes from `main` and half from one of `others` in turn (none: all from `main`), with
    which images are main."""
    def batch_for_step(rng, step, n):
        half = max(1, n // 2)
        images, captions = main.sample(rng, half)
        if others and n > half:
            other_images, other_captions = others[step % len(others)].sample(rng, n - half)
            images, captions = torch.cat([images, other_images]), captions + other_captions
        return images, captions, [i < half for i in range(len(captions))]

    return batch_for_step
