"""Test support: write a diffusers SD1.x, SD2.x or SDXL pipeline as an original (LDM / A1111 / ComfyUI)
single-file checkpoint, to test single-file loading without downloading one.

Key layout of the original modules, as diffusers' single-file loader reads them (and as its
scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py write them):
  UNet   `model.diffusion_model.` input_blocks / middle_block / output_blocks (+ `label_emb` for SDXL)
  VAE    `first_stage_model.` encoder/decoder down/up/mid, mid attention as 1x1-conv `q k v proj_out`
  text   SD1  `cond_stage_model.transformer.text_model.`  (OpenAI CLIP, the transformers layout)
         SD2  `cond_stage_model.model.`  (OpenCLIP: `transformer.resblocks.N.attn.in_proj_weight`, q/k/v stacked,
              `positional_embedding`, `ln_final`, `text_projection` stored (width, projection), `logit_scale`)
         SDXL `conditioner.embedders.0.transformer.text_model.` (CLIP-L) and `conditioner.embedders.1.model.`
              (OpenCLIP bigG, its `text_projection` the transpose of transformers' `text_projection.weight`)

SD2 conditions on the penultimate layer of its OpenCLIP encoder, so a real SD2 file holds one block more
than diffusers' text encoder (24 against 23); the export writes that unused final block too (random
weights), as a real file has it.
"""
from __future__ import annotations

from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"


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
        elif key.startswith("add_embedding.linear_"):  # SDXL's size/crop conditioning
            new = f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
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
        if side in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
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
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            # encoder.mid_block.attentions.0.to_out.0.weight -> encoder.mid.attn_1.proj_out.weight; the original
            # attention is made of 1x1 convolutions, so its matrices carry two trailing unit dimensions
            new = f"{side}.mid.attn_1.{VAE_ATTENTION[parts[4]]}.{parts[-1]}"
            if parts[4] != "group_norm" and parts[-1] == "weight":
                value = value.reshape(*value.shape, 1, 1)
        else:
            raise KeyError(key)
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """OpenAI CLIP (SD1, SDXL's first encoder): the transformers layout under `prefix`, with the
    `position_ids` buffer real files carry."""
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"{prefix}{inner}"] = value
    positions = state.get("embeddings.position_embedding.weight", state.get("text_model.embeddings.position_embedding.weight"))
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions.shape[0]).unsqueeze(0)
    return out


def open_clip_to_ldm(state: dict, prefix: str, extra_blocks: int = 0, seed: int = 0) -> dict:
    """OpenCLIP (SD2, SDXL's second encoder) under `prefix`: q/k/v stacked into `in_proj_*`, the
    projection stored transposed. `extra_blocks` unused final blocks are appended (random weights)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    width = state["embeddings.token_embedding.weight"].shape[1]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for index in layers:
        src = f"encoder.layers.{index}."
        dst = f"{prefix}transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP_NAMES.items():
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    generator = torch.Generator().manual_seed(seed)
    last = f"{prefix}transformer.resblocks.{layers[-1]}."
    for extra in range(extra_blocks):
        for key in [k for k in out if k.startswith(last)]:
            out[key.replace(last, f"{prefix}transformer.resblocks.{layers[-1] + 1 + extra}.")] = \
                torch.randn(out[key].shape, generator=generator) * 0.02
    out[f"{prefix}token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[f"{prefix}ln_final.weight"] = state["final_layer_norm.weight"]
    out[f"{prefix}ln_final.bias"] = state["final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state["text_projection.weight"].T.contiguous()
    else:  # SD2's encoder has a projection its conditioning never uses: a real file still carries it
        out[f"{prefix}text_projection"] = torch.randn(width, width, generator=generator) * width ** -0.5
    out[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    return out


def layout_of(pipe) -> str:
    """SDXL with a second text encoder; SD2 when the text encoder is OpenCLIP (GELU, where OpenAI's CLIP
    uses quick-GELU); SD1 otherwise."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return SD2 if pipe.text_encoder.config.hidden_act == "gelu" else SD1


def export_single_file(pipe, path: Path, layout: str | None = None, metadata: dict[str, str] | None = None,
                       extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `pipe` as an original single-file checkpoint; `metadata` goes to the safetensors header,
    `extra` tensors are added as they are (e.g. ComfyUI's empty `v_pred` marker)."""
    from safetensors.torch import save_file

    layout = layout or layout_of(pipe)
    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    state = unet_to_ldm(pipe.unet.state_dict(), unet_cfg.layers_per_block, len(unet_cfg.block_out_channels))
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(vae_cfg.block_out_channels)))
    if layout == SD1:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    elif layout == SD2:
        state.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model.", extra_blocks=1))
    elif layout == SDXL:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        raise ValueError(layout)
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path
