"""The public configurations of SD1.5 and SDXL, to build pipelines of their exact shapes with random
weights: the real architectures exercised (tests, benchmarks) without downloading any weights.

Values are those of the `config.json` files of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio import paths

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
           up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
              eos_token_id=49407, pad_token_id=1)
OPEN_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


_POOL_SIZE = 1 << 24


def _fill_from_pool(data: torch.Tensor, pool: torch.Tensor, gen: torch.Generator, scale: float) -> None:
    """Copy scaled slices of a uniform(-1, 1) pool, starting at a random offset: memory-copy speed, where
    drawing 3.5 B fresh random numbers takes minutes on one CPU core."""
    flat = data.view(-1)
    done = 0
    while done < flat.numel():
        start = int(torch.randint(0, _POOL_SIZE, (1,), generator=gen))
        take = min(flat.numel() - done, _POOL_SIZE)
        torch.mul(pool[start:start + take], scale, out=flat[done:done + take])
        done += take


def _fast_random(build, seed: int):
    """Construct `build()` with parameters on the meta device, then fill them: random weights need
    no particular init beyond sensible scales (uniform with unit output variance, identity norms,
    zero biases)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.rand(2 * _POOL_SIZE, generator=gen).mul_(2).sub_(1)
    for name, param in list(module.named_parameters()):
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        data = torch.empty(param.shape, dtype=torch.float32)
        if isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            data.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            data.zero_()
        elif data.dim() >= 2 and not isinstance(owner, torch.nn.Embedding):
            _fill_from_pool(data, pool, gen, (3.0 / data[0].numel()) ** 0.5)
        else:
            _fill_from_pool(data, pool, gen, 0.02 * 3 ** 0.5)
        setattr(owner, leaf, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    return module


def _tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(paths.TOKENIZER / "vocab.json"), str(paths.TOKENIZER / "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def random_sd15_pipeline(seed: int = 0, dtype=torch.float32) -> StableDiffusionPipeline:
    """SD1.5's exact architecture with random weights."""
    pipe = StableDiffusionPipeline(
        vae=_fast_random(lambda: AutoencoderKL(**VAE, scaling_factor=0.18215), seed),
        text_encoder=_fast_random(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed + 1),
        tokenizer=_tokenizer(), unet=_fast_random(lambda: UNet2DConditionModel(**SD15_UNET), seed + 2),
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def random_sdxl_pipeline(seed: int = 0, dtype=torch.float32) -> StableDiffusionXLPipeline:
    """SDXL base's exact architecture with random weights."""
    pipe = StableDiffusionXLPipeline(
        vae=_fast_random(lambda: AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=True), seed),
        text_encoder=_fast_random(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed + 1),
        text_encoder_2=_fast_random(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG)), seed + 3),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer(pad_token="!"),
        unet=_fast_random(lambda: UNet2DConditionModel(**SDXL_UNET), seed + 2),
        scheduler=DDIMScheduler(**SCHEDULER), image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
