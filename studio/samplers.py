"""The samplers a composition may name, defined once, by their A1111 names: the spec validates against them, the
web studio and the CLI list them, the engine builds them (a diffusers scheduler from the pipeline's own config,
so the noise schedule and prediction type stay the model's), and the PNG's `parameters` names them.

The table of A1111 names and their diffusers equivalents lives in studio/a1111.py, beside what A1111 writes for
each."""
from __future__ import annotations

from typing import Literal

from studio.a1111 import A1111_SAMPLERS as SAMPLERS  # A1111 name -> (diffusers scheduler class, config changes)

# names earlier presets used
LEGACY_NAMES = {"ddim": "DDIM", "euler": "Euler", "dpm++": "DPM++ 2M", "ddpm": "DDPM"}
EXTRA_SAMPLERS = {"DDPM": ("DDPMScheduler", {})}  # not in A1111; kept for presets that name it
ALL_SAMPLERS = {**SAMPLERS, **EXTRA_SAMPLERS}
SamplerName = Literal[tuple(ALL_SAMPLERS)]  # type: ignore[valid-type]


def canonical_sampler(name):
    """A sampler name as the spec stores it (legacy lower-case names mapped to A1111's)."""
    return LEGACY_NAMES.get(name, name) if isinstance(name, str) else name


def scheduler_for(pipe, name: str | None):
    """The pipeline's scheduler, or the named sampler's scheduler built from its config (same noise schedule)."""
    import diffusers

    if name is None:
        return pipe.scheduler
    class_name, changes = ALL_SAMPLERS[canonical_sampler(name)]
    cls = getattr(diffusers, class_name)
    own = dict(pipe.scheduler.config)
    if own.get("rescale_betas_zero_snr"):
        # A1111's DDIM and UniPC settings (leading spacing; UniPC bh1 of order 3) assume SD1.x's schedule: on a
        # zero-terminal-SNR model (the bundled one) UniPC's update divides by the final alpha of 0 and returns NaN,
        # and leading spacing never reaches the pure-noise step. Such a model keeps its own spacing and UniPC its
        # defaults; the Karras choice stays.
        changes = {k: v for k, v in changes.items() if k == "use_karras_sigmas"}
    if type(pipe.scheduler) is cls and all(own.get(k) == v for k, v in changes.items()):
        return pipe.scheduler
    return cls.from_config(pipe.scheduler.config, **changes)


def sampler_name(scheduler) -> str:
    """The A1111 name of a diffusers scheduler instance (its class and Karras setting), else its class name."""
    class_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, (cls, changes) in ALL_SAMPLERS.items():
        if cls == class_name and bool(changes.get("use_karras_sigmas", False)) == karras:
            return name
    return class_name
