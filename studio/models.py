"""Base-model loading behind one function: the bundled default, a local diffusers folder, a single-file
checkpoint, or a hub id; device and dtype chosen for the machine unless overridden."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from studio import paths
from studio.errors import ModelNotAvailable, StudioError

log = logging.getLogger(__name__)

FAMILY_SD1 = "SD1.x"
FAMILY_SD2 = "SD2.x"
FAMILY_SDXL = "SDXL"
FAMILY_SHAPES = "shapes-world"  # the bundled default model: its own base (text width 128)


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    attention: str  # "sdpa" or "xformers"


def choose_placement(device: str | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """CUDA: fp16 with SDPA (xformers when installed). CPU: fp32 (half precision convolutions are ~80×
    slower on CPU). Either choice can be overridden."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"Device {device!r} was requested but CUDA is not available on this machine; use --device cpu.")
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise StudioError(f"Unknown dtype {dtype!r}; choose one of fp32, fp16, bf16.")
        dtype = names[dtype]
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    attention = "sdpa"
    if device.startswith("cuda"):
        try:
            import xformers  # noqa: F401

            attention = "xformers"
        except ImportError:
            pass
    return Placement(device, dtype, attention)


def load_base_model(ref: str | os.PathLike | None = None, device: str | None = None,
                    dtype: str | torch.dtype | None = None, config: str | os.PathLike | None = None):
    """Load a text-to-image pipeline.

    `ref` is None (the bundled shapes-world model), a local diffusers folder, a single-file SD1.x, SD2.x or
    SDXL `.safetensors` checkpoint (loaded offline from the configurations the studio ships; `config` may
    name a local diffusers folder of the same architecture to use instead), or a hub id (needs the network
    or a populated hub cache).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # the studio shows its own progress; loading bars are noise
    transformers_logging.disable_progress_bar()
    placement = choose_placement(device, dtype)
    if ref is None:
        ref = paths.DEFAULT_MODEL
        if not (Path(ref) / "model_index.json").exists():
            raise ModelNotAvailable(f"The bundled default model is missing from {ref}; re-clone the repository or "
                                    "train it with `studio toyworld train`.")
    path = Path(ref).expanduser()
    kwargs = dict(dtype=placement.dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotAvailable(f"{path} is a folder but not a diffusers pipeline (it has no model_index.json).")
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    elif path.is_file():
        pipe = _load_single_file(path, config, kwargs)
    elif str(ref).count("/") == 1 and not str(ref).startswith((".", "/", "~")) and not path.suffix:
        pipe = _load_hub(str(ref), kwargs)
    else:
        raise ModelNotAvailable(f"No model at {ref}: give a diffusers folder, a .safetensors checkpoint or a hub id.")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(placement.device)
    if placement.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    pipe._studio_placement = placement
    return pipe


def _load_hub(repo_id: str, kwargs):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, **kwargs)
    except Exception as exc:  # the hub client raises many types when offline or when the id is unknown
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower() or "offline" in str(exc).lower()
        reason = "is not available locally and the hub cannot be reached" if offline else f"could not be loaded ({type(exc).__name__})"
        raise ModelNotAvailable(f"The model {repo_id!r} {reason}; point --model at a local diffusers folder or a "
                                f".safetensors checkpoint.") from exc


def _load_single_file(path: Path, config, kwargs):
    """A single-file checkpoint, offline: studio.checkpoints picks the shipped configuration of its family
    (sized from its tensors) unless `config` names a local diffusers folder to use instead."""
    from studio.checkpoints import load_single_file

    return load_single_file(path, dtype=kwargs.get("dtype"), config=config)


def model_family(pipe) -> str:
    """SD1.x, SD2.x, SDXL or shapes-world, from the UNet's cross-attention width (768, 1024, 2048, 128)."""
    dim = pipe.unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    if getattr(pipe, "text_encoder_2", None) is not None or dim == 2048:
        return FAMILY_SDXL
    if dim == 1024:
        return FAMILY_SD2
    if dim == 128:
        return FAMILY_SHAPES
    return FAMILY_SD1


def pipeline_fingerprint(pipe) -> str:
    """sha256 of everything a run may change on a loaded pipeline: every weight and buffer of its networks (by
    value), the class of every module (a LoRA wrapper left behind shows), every attention processor, the
    scheduler's class and configuration. Equal before and after a refused or finished run means nothing was
    left behind."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        digest.update(component.encode())
        for name, child in module.named_modules():
            digest.update(f"{name}:{type(child).__name__};".encode())
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                          if tensor.numel() else b"")
        digest.update(json.dumps({name: type(p).__name__ for name, p in
                                  getattr(module, "attn_processors", {}).items()}, sort_keys=True).encode())
    digest.update(type(pipe.scheduler).__name__.encode())
    digest.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    return digest.hexdigest()
