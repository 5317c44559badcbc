"""What one request may ask of the studio, checked before any work starts so that nothing is ever half-run.

Defaults depend on the device the model runs on; each limit can be changed by an environment variable
(`LORA_STUDIO_MAX_PIXELS`, `LORA_STUDIO_MAX_STEPS`, `LORA_STUDIO_MAX_LORAS`, `LORA_STUDIO_MAX_UPLOAD_MB`,
`LORA_STUDIO_MAX_IMAGES`, `LORA_STUDIO_MAX_QUEUE`), by the CLI's `--max-…` options, or in Python (`Studio.load(limits=Limits(...))`).
A refusal names the limit and how to change it."""
from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from studio.errors import StudioError

# name -> (environment variable, CLI option, scale from the variable's unit to the field's)
SETTINGS = {"max_pixels": ("LORA_STUDIO_MAX_PIXELS", "--max-pixels", 1),
            "max_steps": ("LORA_STUDIO_MAX_STEPS", "--max-steps", 1),
            "max_loras": ("LORA_STUDIO_MAX_LORAS", "--max-loras", 1),
            "max_upload_bytes": ("LORA_STUDIO_MAX_UPLOAD_MB", "--max-upload-mb", 1 << 20),
            "max_images": ("LORA_STUDIO_MAX_IMAGES", "--max-images", 1),
            "max_queue": ("LORA_STUDIO_MAX_QUEUE", "--max-queue", 1)}


class LimitExceeded(StudioError):
    pass


class Limits(BaseModel):
    """Per-request limits. `max_pixels`: width × height of one image; `max_steps`: denoising steps; `max_loras`:
    LoRAs in one composition; `max_upload_bytes`: one file uploaded to the web studio; `max_images`: images
    (seeds) in one `generate` call; `max_queue`: requests waiting in the web studio's queue (more are turned away
    with "the queue is full")."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixels: int = Field(1024 * 1024, ge=64 * 64)
    max_steps: int = Field(150, ge=1)  # A1111's own steps slider stops at 150
    max_loras: int = Field(16, ge=1)
    max_upload_bytes: int = Field(2 << 30, ge=1 << 20)
    max_images: int = Field(64, ge=1)
    max_queue: int = Field(64, ge=1)

    @classmethod
    def for_device(cls, device: str | None = None, **overrides: Any) -> "Limits":
        """The defaults for a device (CPU: 1024² pixels; CUDA: 4096²; None: the device this machine runs on),
        then the environment, then `overrides` (None values ignored)."""
        if device is None:
            from studio.models import choose_placement

            device = choose_placement().device
        values: dict[str, Any] = {"max_pixels": 4096 * 4096 if str(device).startswith("cuda") else 1024 * 1024}
        for name, (variable, _, unit) in SETTINGS.items():
            text = os.environ.get(variable)
            if text:
                try:
                    values[name] = int(float(text) * unit)
                except ValueError:
                    raise StudioError(f"The environment variable {variable}={text!r} is not a number.") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "limits"
            raise StudioError(f"The limit {name} ({values.get(name)!r}) is not allowed: "
                              f"{first['msg'].removeprefix('Value error, ')}.") from None

    def refuse(self, name: str, asked: str, allowed: str) -> LimitExceeded:
        variable, option, _ = SETTINGS[name]
        return LimitExceeded(f"{asked} is over this studio's limit `{name}` ({allowed}); it was refused before "
                             f"anything ran (raise the limit with {option} or {variable}).")

    def check(self, width: int, height: int, steps: int, n_loras: int, images: int = 1) -> None:
        """Raise LimitExceeded, naming the limit, when a request is over one."""
        if width * height > self.max_pixels:
            raise self.refuse("max_pixels", f"An image of {width}×{height} = {width * height:,} pixels",
                              f"{self.max_pixels:,} pixels")
        if steps > self.max_steps:
            raise self.refuse("max_steps", f"{steps} steps", f"{self.max_steps}")
        if n_loras > self.max_loras:
            raise self.refuse("max_loras", f"A composition of {n_loras} LoRAs", f"{self.max_loras}")
        if images > self.max_images:
            raise self.refuse("max_images", f"{images} images in one call", f"{self.max_images}")

    def check_upload(self, name: str, size: int) -> None:
        if size > self.max_upload_bytes:
            raise self.refuse("max_upload_bytes", f"The upload {name} ({size / 2**20:.1f} MiB)",
                              f"{self.max_upload_bytes / 2**20:.0f} MiB")
