"""Run a composition: load and attach its LoRAs, run its method in the shared sampler loop, and leave the
pipeline exactly as it was (adapters detached, processors restored), whatever happens."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from attention.controller import CompositionController
from composers import get_composer
from studio.engine import ComposeResult, Session, StepInfo, sample
from studio.errors import LoraError, PresetError
from studio.generation import default_size
from studio.samplers import scheduler_for
from studio.spec import Composition

if TYPE_CHECKING:
    from composers.base import Composer
    from studio.limits import Limits
    from studio.lora import LoraWeights


def adapter_name(index: int, file: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(file).stem)[:40]
    return f"l{index}_{stem}"


def load_entries(composition: Composition, load: Callable[[str], "LoraWeights"] | None = None) -> dict:
    """Adapter name -> (entry, LoraWeights) for each entry, its sha256 checked when the composition records one.
    `load` reads an entry's file (default: from disk; the Studio passes its cache)."""
    loaded = {}
    for i, entry in enumerate(composition.loras):
        weights = (load or _read_lora_file)(entry.file)
        if entry.sha256 and weights.info.sha256 != entry.sha256.lower():
            raise LoraError(f"{Path(entry.file).name} does not match the sha256 the composition recorded; the "
                            "file has changed.")
        loaded[adapter_name(i, entry.file)] = (entry, weights)
    return loaded


def _read_lora_file(file: str):
    from studio.lora import load_lora

    path = Path(file).expanduser()
    if not path.exists():
        raise LoraError(f"The LoRA file {file} named in the composition does not exist.")
    return load_lora(path)


def compose(pipe, composition: Composition, callback: Callable[[StepInfo], bool | None] | None = None,
            loaded: dict | None = None) -> ComposeResult:
    from studio.samplers import sampler_name

    with prepared_session(pipe, composition, loaded) as (session, composer):
        result = sample(session, composer, callback)
        result.info["sampler"] = sampler_name(pipe.scheduler)
    result.info.update(composer.report())
    result.info["loras"] = {name: {"file": str(weights.info.path), "short_hash": weights.info.short_hash,
                                   "sha256": weights.info.sha256} for name, weights in session.loras.items()}
    return result


@dataclass(frozen=True)
class Plan:
    """What a composition will run, checked: its method, the method's parameters and the image size."""
    composer_cls: type
    params: object
    height: int
    width: int


def check_composition(pipe, composition: Composition, limits: "Limits | None" = None, images: int = 1) -> Plan:
    """Everything about a composition that can be refused without running it: the method and its parameters,
    regions where the method needs them, the size for this model (`pipe` None: only sizes the composition
    gives), the limits, and each painted mask. Raises a StudioError (one sentence) before any work starts."""
    composer_cls = get_composer(composition.method)
    params = _params(composer_cls, composition)
    unplaced = [e for e in composition.loras if e.role == "concept" and e.region is None]
    if composer_cls.needs_regions and unplaced:
        raise PresetError(f"The method {composition.method!r} needs a region (box or mask) for each concept LoRA; "
                          f"{Path(unplaced[0].file).name} has none.")
    size = default_size(pipe) if pipe is not None else 0  # without a model (a batch driver): sizes given only
    height, width = composition.height or size, composition.width or size
    factor = pipe.vae_scale_factor if pipe is not None else 8
    if height % factor or width % factor:
        raise PresetError(f"The size {width}×{height} is not a multiple of this model's latent factor {factor}.")
    if limits is not None:
        limits.check(width, height, composition.steps, len(composition.loras), images)
    for entry in composition.loras:
        if entry.region is not None and entry.region.mask is not None:
            check_mask(entry.region.mask, Path(entry.file).name)
    return Plan(composer_cls, params, height, width)


def check_mask(mask: str, owner: str) -> None:
    """A painted mask must be a readable image of sane size (a decompression bomb is refused unread)."""
    from attention.masks import MAX_MASK_PIXELS, open_mask_image

    try:
        with open_mask_image(mask) as image:
            pixels = image.size[0] * image.size[1]
    except Exception:  # noqa: BLE001 — an image decoder fed untrusted bytes raises many types; all mean "unreadable"
        shown = "its embedded image" if mask.startswith("data:") else Path(mask).name
        raise PresetError(f"The mask of {owner} ({shown}) cannot be read as an image.") from None
    if pixels > MAX_MASK_PIXELS:
        raise PresetError(f"The mask of {owner} has {pixels:,} pixels, more than the {MAX_MASK_PIXELS:,} a mask "
                          "may have.")


@contextlib.contextmanager
def prepared_session(pipe, composition: Composition, loaded: dict | None = None
                     ) -> Iterator[tuple[Session, "Composer"]]:
    """A session with the composition's LoRAs attached and its method set up; on exit (normal, error or
    cancel) the method is torn down and the LoRAs detached, leaving the pipeline as it was."""
    from studio.lora.inject import attach_lora, detach_lora, text_encoder_layers

    plan = check_composition(pipe, composition)
    composer = plan.composer_cls(plan.params)
    loaded = loaded if loaded is not None else load_entries(composition)
    height, width, factor = plan.height, plan.width, pipe.vae_scale_factor
    session = Session(pipe=pipe, prompt=composition.prompt, negative_prompt=composition.negative_prompt,
                      height=height, width=width, steps=composition.steps, guidance=composition.guidance,
                      generator=torch.Generator("cpu").manual_seed(composition.seed),
                      controller=CompositionController((height // factor, width // factor)))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):  # guidance needs ∇z only, never ∇W
        module = getattr(pipe, component, None)
        if module is not None:
            module.requires_grad_(False)
    attached = []
    own_scheduler, pipe.scheduler = pipe.scheduler, scheduler_for(pipe, composition.scheduler)
    try:
        for name, (entry, weights) in loaded.items():
            attach_lora(pipe, weights, name, entry.weight)
            attached.append(name)
            if entry.text_encoder_weight is not None:
                for layer in text_encoder_layers(pipe).values():
                    if name in layer.weights:
                        layer.weights[name] = entry.text_encoder_weight
            session.adapters[name] = entry
            session.loras[name] = weights
        session.embedding_transform = _decor_transform(pipe, composition.decor, composition.decor_strength)
        session.adapter_transforms = {name: _decor_transform(pipe, entry.decor, entry.decor_strength)
                                      for name, entry in session.adapters.items() if entry.decor}
        try:  # a setup that fails half-way is torn down too: composers start their state in __init__
            composer.setup(session)
            yield session, composer
        finally:
            composer.teardown(session)
    finally:
        for name in reversed(attached):
            detach_lora(pipe, name)
        pipe.scheduler = own_scheduler


def _params(composer_cls, composition: Composition):
    from pydantic import ValidationError

    from studio.spec import describe_validation_error

    try:
        return composer_cls.Params.model_validate(composition.params)
    except ValidationError as exc:
        raise PresetError(describe_validation_error(exc, f"params of method {composition.method!r}")) from None


def _decor_transform(pipe, words: list[str], strength: float):
    if not words:
        return None
    from studio.decor import decor_transform

    return decor_transform(pipe, words, strength)
