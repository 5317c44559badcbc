"""Test support: write a diffusers StableDiffusionPipeline as an original (LDM / A1111) single-file
checkpoint, to test single-file loading without downloading one. Key layout of the original
`model.diffusion_model` / `first_stage_model` / `cond_stage_model` modules."""
from __future__ import annotations

from pathlib import Path

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


def _rename_resnet(rest: str, table: dict) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}" if tail else table.get(head, head)


def unet_to_ldm(state: dict, layers_per_block: int, n_levels: int) -> dict:
    slots = layers_per_block + 1
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("time_embedding.linear_"):
            new = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif key.startswith("conv_in."):
            new = f"input_blocks.0.0.{parts[1]}"
        elif key.startswith("conv_norm_out."):
            new = f"out.0.{parts[1]}"
        elif key.startswith("conv_out."):
            new = f"out.2.{parts[1]}"
        elif key.startswith("down_blocks."):
            level, kind, index, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{level * slots + int(index) + 1}.0.{_rename_resnet(rest, RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{level * slots + int(index) + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(level + 1) * slots}.0.op.{parts[-1]}"
        elif key.startswith("mid_block."):
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename_resnet(rest, RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif key.startswith("up_blocks."):
            level, kind, index, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{level * slots + int(index)}.0.{_rename_resnet(rest, RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{level * slots + int(index)}.1.{rest}"
            else:  # upsamplers.0.conv: after the resnet and, where the level has attention, the attention
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
                new = f"output_blocks.{level * slots + slots - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(key)
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(state: dict, n_levels: int) -> dict:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if side == "encoder" else n_levels - 1 - int(parts[2])
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                new = f"{side}.{group}.{level}.block.{parts[4]}.{_rename_resnet('.'.join(parts[5:]), VAE_RESNET)}"
            else:
                new = f"{side}.{group}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{_rename_resnet('.'.join(parts[4:]), VAE_RESNET)}"
        else:
            raise KeyError(key)
        out[f"first_stage_model.{new}"] = value
    return out


def export_single_file(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    state = unet_to_ldm(pipe.unet.state_dict(), unet_cfg.layers_per_block, len(unet_cfg.block_out_channels))
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(vae_cfg.block_out_channels)))
    for key, value in pipe.text_encoder.state_dict().items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{inner}"] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
