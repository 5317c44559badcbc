"""Regions rasterised to token grids: rows = height, cols = width, never assumed square."""
from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
import torch.nn.functional as F


def box_mask(box, height: int, width: int) -> torch.Tensor:
    """Hard mask (height, width) of a relative box (x0, y0, x1, y1); at least one cell is inside."""
    x0, y0, x1, y1 = box
    r0, r1 = int(math.floor(y0 * height + 1e-6)), int(math.ceil(y1 * height - 1e-6))
    c0, c1 = int(math.floor(x0 * width + 1e-6)), int(math.ceil(x1 * width - 1e-6))
    mask = torch.zeros(height, width)
    mask[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = 1.0
    return mask


DATA_URI_PREFIX = "data:image/png;base64,"


def mask_data_uri(path_or_image) -> str:
    """A mask image as a PNG data URI, so that a preset or a PNG's composition carries its painted masks."""
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    buffer = io.BytesIO()
    image.convert("L").save(buffer, format="PNG")
    return DATA_URI_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


MAX_MASK_PIXELS = 4096 * 4096


def open_mask_image(path_or_uri: str):
    """The mask image of a path or a `data:image/png;base64,` URI, opened lazily (pixels not decoded yet)."""
    from PIL import Image

    if path_or_uri.startswith("data:"):
        if not path_or_uri.startswith(DATA_URI_PREFIX):
            raise ValueError("a mask's data URI must be a base64 PNG")
        return Image.open(io.BytesIO(base64.b64decode(path_or_uri[len(DATA_URI_PREFIX):], validate=True)))
    return Image.open(path_or_uri)


def image_mask(path_or_image, height: int, width: int) -> torch.Tensor:
    """Soft mask (height, width) in [0, 1] from a greyscale image (white = inside)."""
    from PIL import Image

    # compose.check_composition has refused unreadable and oversized masks before any run reaches here
    image = path_or_image if isinstance(path_or_image, Image.Image) else open_mask_image(path_or_image)
    resized = image.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, np.float32) / 255.0)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-average a (H, W) mask down (or nearest up) to (height, width)."""
    if mask.shape == (height, width):
        return mask
    mode = "area" if height <= mask.shape[0] and width <= mask.shape[1] else "nearest"
    return F.interpolate(mask[None, None], size=(height, width), mode=mode)[0, 0]


def token_grid(n_tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The (rows, cols) grid of a layer with n_tokens spatial tokens, following the UNet's stride-2
    downsamplers (ceil division) from the latent size."""
    h, w = latent_height, latent_width
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not form a grid of a {latent_height}×{latent_width} latent")
    return h, w


def blend_weights(masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-region blend weights where overlapping regions average, and the background's weight: the
    weights of every cell sum to 1."""
    if not masks:
        raise ValueError("no masks")
    total = torch.stack(masks).sum(0)
    region_weights = [m / total.clamp(min=1.0) for m in masks]
    return region_weights, (1.0 - total).clamp(min=0.0)


def isolation_mask(masks: list[torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """Boolean (N, N) self-attention mask of LoRA-Composer's concept isolation: a query inside box k may
    not attend keys inside any box it is not in; background queries attend everywhere. True = attend."""
    member = torch.stack([m.flatten() > threshold for m in masks], dim=1)  # (N, R)
    in_some_box = member.any(1)
    # forbidden[q, k] = any_j (key in j and query not in j), for queries inside some box
    forbidden = torch.einsum("qr,kr->qk", (~member).float(), member.float()) > 0
    return ~(forbidden & in_some_box[:, None])
