"""Components of the bundled default model: a standard StableDiffusionPipeline at toy scale.

The UNet keeps SD1.5's block structure (four down/up blocks, a cross-attention mid block, attn1 and
attn2 in every transformer block) so that every attention processor sees what it sees on SD1.5; the
composers' "H/32" layers (down_blocks.2, up_blocks.1) have 8×8 maps at 64×64 pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

LATENT_SIZE = 32
LATENT_CHANNELS = 4
TEXT_HIDDEN = 128

# Zero terminal SNR + v-prediction (Lin et al. 2023): flat white and black backgrounds are reachable
# only when the last timestep carries no signal.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                clip_sample=False, steps_offset=1)


def build_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77)


def build_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=TEXT_HIDDEN, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
        mid_block_add_attention=False,
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE)


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def export_pipeline(pipe: StableDiffusionPipeline, out_dir: Path) -> None:
    """Save as a diffusers folder of fp16 safetensors (loaded back in fp32 on CPU)."""
    import copy
    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(str(out_dir), safe_serialization=True)
