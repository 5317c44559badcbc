"""Synthetic LoRA files for a given pipeline (tests and benchmarks): random low-rank factors on its
attention, feed-forward and projection layers (and text encoder), written in kohya format with ss_*
metadata."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from studio.lora.kohya_export import save_kohya

UNET_LAYERS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
TEXT_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def _factors(module: nn.Module, rank: int, gen: torch.Generator, strength: float):
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) / fan_in ** 0.5
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * strength
    else:
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=gen) * strength
    return down, up


def write_random_lora(path: Path, pipe, base: str, rank: int = 4, seed: int = 0, strength: float = 0.5,
                      text_encoder: bool = True, trigger: str | None = None) -> Path:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(UNET_LAYERS) and "attentions" in name:
            down, up = _factors(module, rank, gen, strength)
            modules[("unet", name)] = (down, up, float(rank))
    if text_encoder:
        for name, module in pipe.text_encoder.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(TEXT_LAYERS):
                down, up = _factors(module, rank, gen, strength)
                modules[("text_encoder", name)] = (down, up, float(rank))
    metadata = {"ss_base_model_version": base, "ss_output_name": Path(path).stem}
    if trigger:
        metadata["ss_tag_frequency"] = {"img": {trigger: 10}}
        metadata["modelspec.trigger_phrase"] = trigger
    return save_kohya(path, modules, metadata, dtype=torch.float32)
