"""The composition spec: what a preset saves, versioned and JSON-serialisable (pydantic)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from studio.errors import PresetError
from studio.samplers import SamplerName, canonical_sampler

SPEC_VERSION = 1
MAX_PRESET_BYTES = 64 << 20  # a preset with embedded masks is kilobytes; this only stops absurd files


class Region(BaseModel):
    """Where a concept goes: a box in relative coordinates (x0, y0, x1, y1), a painted mask image (path of a
    greyscale PNG, or the PNG itself as a `data:image/png;base64,` URI; white = inside), or `auto` (the regional method places it where its trigger words attend)."""
    model_config = ConfigDict(extra="forbid")

    box: Optional[tuple[float, float, float, float]] = None
    mask: Optional[str] = None
    auto: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.box is not None) + (self.mask is not None) + self.auto != 1:
            raise ValueError("a region needs exactly one of `box`, `mask` or `auto: true`")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"box {self.box} must satisfy 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1")
        return self


class LoraEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: Optional[str] = Field(None, description="Full sha256 of the file, checked when loading.")
    weight: float = 1.0
    text_encoder_weight: Optional[float] = Field(None, description="Weight in the text encoders when it differs "
                                                                   "from `weight` (A1111's <lora:name:te:unet>).")
    role: Literal["concept", "style"] = "concept"
    trigger_words: list[str] = Field(default_factory=list)
    region: Optional[Region] = None
    prompt: Optional[str] = Field(None, description="Region prompt (concepts); default: the global prompt.")
    negative_prompt: Optional[str] = None
    decor: list[str] = Field(default_factory=list, description="Words whose embedding span DECOR removes "
                                                               "while this LoRA is used.")
    decor_strength: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("weight", "text_encoder_weight")
    @classmethod
    def _weight(cls, value):
        if value is not None and not -4.0 <= value <= 4.0:
            raise ValueError(f"weight {value} is outside [-4, 4]")
        return value


class Composition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = SPEC_VERSION
    base_model: Optional[str] = Field(None, description="Folder, .safetensors file or hub id; None = bundled model.")
    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = Field(None, ge=16, le=4096)
    height: Optional[int] = Field(None, ge=16, le=4096)
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(5.0, ge=0.0, le=50.0)
    scheduler: Optional[SamplerName] = Field(
        None, description="Sampler for this run, by its A1111 name (Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, "
                          "DPM++ SDE Karras, UniPC, DDIM, LCM); None keeps the model's own (the bundled model's: DDIM).")
    seed: int = Field(0, ge=0, le=2**64 - 1, description="Seed of the initial noise (torch's range: 0 … 2⁶⁴−1).")
    loras: list[LoraEntry] = Field(default_factory=list)
    method: str = "regional"
    params: dict[str, Any] = Field(default_factory=dict)
    decor: list[str] = Field(default_factory=list, description="Words whose embedding span DECOR removes from "
                                                               "every prompt.")
    decor_strength: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _a1111_sampler_name(cls, value):
        return canonical_sampler(value)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    def with_overrides(self, **fields) -> "Composition":
        """A copy with some fields changed (None leaves a field as it is), validated like a preset. Changing the
        method drops the old method's parameters unless `params` is given too."""
        update = {k: v for k, v in fields.items() if v is not None}
        if not update:
            return self
        if "method" in update and update["method"] != self.method and "params" not in update:
            update["params"] = {}
        data = self.model_dump(mode="json")
        data.update({k: v.model_dump(mode="json") if isinstance(v, BaseModel) else
                     [x.model_dump(mode="json") if isinstance(x, BaseModel) else x for x in v] if isinstance(v, list)
                     else v for k, v in update.items()})
        return parse_composition(data, "the overrides")

    def portable(self, sha256s: list[str] | None = None) -> "Composition":
        """The composition as it travels (in a PNG, to a Ray worker, into a batch key): LoRAs by file name and
        sha256 (`sha256s`, else as recorded, else computed from the file), painted masks embedded as data URIs."""
        from attention.masks import mask_data_uri
        from studio.lora.hashes import file_hashes

        loras = []
        for i, entry in enumerate(self.loras):
            sha256 = sha256s[i] if sha256s else entry.sha256 or file_hashes(Path(entry.file), None).sha256
            update = {"file": Path(entry.file).name, "sha256": sha256}
            mask = entry.region.mask if entry.region is not None else None
            if mask and not mask.startswith("data:"):
                update["region"] = entry.region.model_copy(update={"mask": mask_data_uri(mask)})
            loras.append(entry.model_copy(update=update))
        return self.model_copy(update={"loras": loras})

    def digest(self) -> str:
        """sha256 of the composition as it will run (canonical JSON): equal compositions, equal digests."""
        import hashlib

        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def describe_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the preset"
    more = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"{source}: field `{where}` {first['msg'].removeprefix('Value error, ')}{more}."


def parse_composition(data: dict | str, source: str = "preset") -> Composition:
    try:
        if isinstance(data, str):
            return Composition.model_validate_json(data)
        return Composition.model_validate(data)
    except ValidationError as exc:
        raise PresetError(describe_validation_error(exc, source)) from None


def load_preset(path: Path) -> Composition:
    """A preset file (.json), or a PNG made by the studio (its lossless `lora-studio` chunk)."""
    path = Path(path)
    if not path.exists():
        raise PresetError(f"The preset {path} does not exist.")
    if not path.is_file():
        raise PresetError(f"The preset {path} is a folder, not a file.")
    if path.stat().st_size > MAX_PRESET_BYTES:
        raise PresetError(f"The preset {path.name} is {path.stat().st_size / 2**20:.0f} MiB; a preset is at most "
                          f"{MAX_PRESET_BYTES // 2**20} MiB.")
    try:
        data = _png_composition(path) if path.suffix.lower() == ".png" else path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PresetError(f"{path.name} is not a text file (not UTF-8), so not a preset.") from None
    except OSError as exc:
        raise PresetError(f"The preset {path.name} cannot be read ({exc.strerror or exc}).") from None
    return _resolve_paths(composition_from_json(data, path.name), path.parent)


def composition_from_json(text: str, source: str) -> Composition:
    """A composition from preset JSON text; `source` names it in the refusal."""
    if len(text) > MAX_PRESET_BYTES:
        raise PresetError(f"{source} is over {MAX_PRESET_BYTES // 2**20} MiB; a preset is at most that.")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PresetError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{source} holds a JSON {type(raw).__name__}, not a composition (a JSON object).")
    return parse_composition(raw, source)


def _png_composition(path: Path) -> str:
    """The `lora-studio` text chunk of a PNG made by the studio."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise PresetError(f"{path.name} is a {image.format} image, not a PNG made by the studio.")
            text = image.text.get("lora-studio")
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise PresetError(f"{path.name} is not a readable PNG image ({str(exc).splitlines()[0][:80] or 'corrupt'})."
                          ) from None
    if text is None:
        raise PresetError(f"{path.name} carries no LoRA Studio composition (no `lora-studio` PNG chunk).")
    return text


def _resolve_paths(composition: Composition, base: Path) -> Composition:
    """LoRA files and masks named relative to the preset's folder."""
    loras = []
    for entry in composition.loras:
        update = {}
        if not Path(entry.file).is_absolute() and (base / entry.file).exists():
            update["file"] = str((base / entry.file).resolve())
        mask = entry.region.mask if entry.region else None
        if mask and not mask.startswith("data:") and not Path(mask).is_absolute():
            update["region"] = entry.region.model_copy(update={"mask": str((base / entry.region.mask).resolve())})
        loras.append(entry.model_copy(update=update))
    return composition.model_copy(update={"loras": loras})


def save_preset(composition: Composition, path: Path) -> None:
    """Written atomically: a crash while saving leaves the previous version of the file intact."""
    from studio.files import write_text_atomic

    write_text_atomic(path, composition.model_dump_json(indent=2, exclude_none=True))
