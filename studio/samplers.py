"""The samplers a composition may name, defined once: the spec validates against them, the web studio lists
them, the engine builds them (a diffusers scheduler from the pipeline's own config, so the noise schedule and
prediction type stay the model's)."""
from __future__ import annotations

from typing import Literal

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
SamplerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]


def scheduler_for(pipe, name: str | None):
    """The pipeline's scheduler, or one of the named class built from its config (same noise schedule)."""
    import diffusers

    if name is None:
        return pipe.scheduler
    cls = getattr(diffusers, SCHEDULERS[name])
    return pipe.scheduler if type(pipe.scheduler) is cls else cls.from_config(pipe.scheduler.config)
