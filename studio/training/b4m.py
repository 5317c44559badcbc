"""Break-for-Make training (docs/methods.md §4, docs/break-for-make.md): "break" trains one PLP adapter (content
or style), "make" assembles a pair and optionally fine-tunes it jointly, as the official second stage does."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from studio.errors import LoraError, StudioError
from studio.training.step import denoising_loss
from studio.training.words import TriggerWord, check_new_word
from studio.training.datasets import ImageFolder, half_from_each, render_batch
from studio.training.plp import (PLPFactors, assemble, assembled_embeddings, assembled_weights, create_plp_adapter,
                                 save_assembled, save_plp_adapter, unwrap, wrap)

MAIN_HALF = {"content": "D", "style": "B"}  # the learnable half each role's main images teach


def make(pipe, content_path: Path, style_path: Path, out_path: Path, finetune_steps: int = 0, lr: float = 1e-4,
         content_images: Path | None = None, style_images: Path | None = None, progress: bool = True,
         command: str = "") -> Path:
    """"Make": assemble the pair, then (with `finetune_steps`) fine-tune both learnable halves jointly on the
    content's and the style's images: the shapes world's, drawn again from each adapter's recorded config, or the
    given folders (needed for adapters trained on your images). Writes one ordinary LoRA with both adapters' words;
    `pipe` is only needed for the fine-tune."""
    from studio.lora import inspect_lora
    from studio.lora.inject import check_fits

    fused = assemble(content_path, style_path)
    words = assembled_embeddings(content_path, style_path)
    content_info = inspect_lora(content_path)
    content_meta, style_meta = content_info.metadata, inspect_lora(style_path).metadata
    if finetune_steps:
        if content_images is not None or style_images is not None:
            if content_images is None or style_images is None:
                raise LoraError("The joint fine-tune on your images needs both folders: the content's and the style's.")
            from studio.generation import default_size

            size = default_size(pipe)
            batches = folder_pair(ImageFolder(content_images, size), ImageFolder(style_images, size))
            batch_size, seed = 2, 1
        else:
            missing = [Path(p).name for p, m in ((content_path, content_meta), (style_path, style_meta))
                       if "studio_b4m_config" not in m]
            if missing:
                raise LoraError(f"{missing[0]} was trained on your own images, so the joint fine-tune needs them "
                                "again: `studio b4m make … --content-images DIR --style-images DIR`.")
            content_cfg, style_cfg = (BreakConfig(**json.loads(m["studio_b4m_config"]))
                                      for m in (content_meta, style_meta))
            batches = shapes_world_pair(content_cfg, style_cfg)
            batch_size, seed = content_cfg.batch_size, content_cfg.data_seed + 1
        check_fits(pipe, assembled_weights(fused, content_info))  # a pair of another base model: one sentence
        fused = joint_finetune(pipe, fused, batches, finetune_steps, lr, batch_size, seed, progress, words=words)
    return save_assembled(out_path, fused, content_path, style_path, content_meta, words,
                           {"b4m_finetune_steps": str(finetune_steps), "ss_training_comment": command})


@dataclass
class BreakConfig:
    role: str  # "content" | "style"
    kind: str  # what the main images teach: "concept" (a shape) or "style" (a texture)
    subject: str
    trigger: str
    seed: int = 0  # the shared seed of the frozen halves
    rank: int = 8
    steps: int = 400
    batch_size: int = 8
    main_lr: float = 1e-3  # official 1e-4 on SD; the tiny model learns faster
    aux_lr: float = 1e-4  # official 1e-5
    data_seed: int = 1
    embedding: bool = False  # also learn the trigger as a new word, bundled in the adapter
    embedding_lr: float = 5e-3
    trigger_after_noun: bool = False  # a style trigger right after the noun, where it leaves the content's words as they are
    # Content only: the styles (textures or palettes) of the auxiliary sets B learns from, one per step in turn (the
    # paper's auxiliary style sets); empty, the base textures, which the base model draws already.
    aux_styles: tuple = ()
    # Each learnable half learns only from its own images (D from the content, B from the auxiliary sets, for a
    # content adapter; the mirror for a style one): the official trainers' split, one optimiser per loss (theirs
    # carry gradients over between the two); else both halves learn from every image, at their own rates.
    split_sets: bool = False


def _train_plp(pipe, factors: dict[str, PLPFactors], batch_for_step, lr_B: float, lr_D: float, steps: int,
               batch_size: int, seed: int, desc: str, progress: bool, word: str | None = None, lr_word: float = 0.0,
               main_half: str | None = None) -> tuple[dict[str, PLPFactors], dict]:
    """Train the learnable halves (B at lr_B, D at lr_D; a zero rate freezes one) of PLP adapters wrapped
    into the UNet; the frozen halves never change. `batch_for_step(rng, step, n)` gives (images in
    [-1, 1], captions) or (images, captions, main) with `main` a boolean per image; the loss follows the
    model's own noise schedule and prediction type, and the conditioning is encoded as the pipeline encodes
    it (both text encoders on SDXL). With `main_half` ("D" or "B"), that half (and the word) learns only from
    the main images and the other half only from the rest (the official trainers' one optimiser per loss);
    without it both halves learn from the whole batch. With `word`, that trigger is also learnt as a new
    token of the (first) text encoder, at lr_word; returns the factors and the learnt words
    ({word: {"text_encoder": vector}}, empty without one)."""
    from diffusers import DDPMScheduler

    from studio.engine import encode
    from studio.toyworld.train import encode_latents

    unet, vae = pipe.unet, pipe.vae
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    wrapped, trigger = wrap(unet, factors), None
    try:
        trigger = TriggerWord(pipe, word) if word else None
        groups = [{"params": [l.B for l in wrapped.values()], "lr": lr_B},
                  {"params": [l.D for l in wrapped.values()], "lr": lr_D}]
        if trigger is not None:
            groups.append({"params": [trigger.table], "lr": lr_word, "weight_decay": 0.0})
        opt = torch.optim.AdamW([g for g in groups if g["lr"] > 0])
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        rng = random.Random(seed)
        halves = {"B": [l.B for l in wrapped.values()], "D": [l.D for l in wrapped.values()]}
        for step in tqdm(range(steps), desc=desc, disable=not progress):
            images, captions, *main = batch_for_step(rng, step, batch_size)
            images = images.to(device=vae.device, dtype=vae.dtype)
            gen = torch.Generator().manual_seed(seed * 7919 + step)
            latents = encode_latents(vae, images).to(unet.dtype)
            with torch.set_grad_enabled(trigger is not None):
                cond = encode(pipe, captions, None, images.shape[-2], images.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss = denoising_loss(unet, noise_scheduler, latents, cond.embeds, gen, cond.added,
                                  per_image=main_half is not None)
            if main_half is None:
                loss.backward()
            else:
                is_main = torch.as_tensor(main[0], dtype=torch.bool, device=loss.device)
                main_params = halves[main_half] + ([trigger.table] if trigger is not None else [])
                other_params = halves["D" if main_half == "B" else "B"]
                for params, chosen in ((main_params, is_main), (other_params, ~is_main)):
                    if chosen.any():
                        grads = torch.autograd.grad(loss[chosen].mean(), params, retain_graph=True,
                                                    allow_unused=True)
                        for param, grad in zip(params, grads):
                            param.grad = grad
            opt.step()
        trained = {name: layer.factors() for name, layer in wrapped.items()}
    finally:
        unwrap(unet, wrapped)
        words = {word: {"text_encoder": trigger.finish()}} if trigger is not None else {}  # tokenizer as it was
    return trained, words


def break_train_folders(pipe, role: str, main: ImageFolder, auxiliary: list[ImageFolder], out_path: Path,
                        seed: int = 7, rank: int = 64, steps: int = 500, batch_size: int = 2,
                        main_lr: float = 1e-4, aux_lr: float = 1e-5, progress: bool = True, command: str = "",
                        split_sets: bool = False) -> Path:
    """"Break" on a real model: the content adapter learns D on the content images (official lr 1e-4)
    while B sees the auxiliary style sets (1e-5); the style adapter is the mirror image. Half of every
    batch comes from the main images, half from one auxiliary set in turn. `split_sets`: each half learns
    only from its own images (`BreakConfig.split_sets`)."""
    lr_B, lr_D = (aux_lr, main_lr) if role == "content" else (main_lr, aux_lr)
    trained, _ = _train_plp(pipe, create_plp_adapter(pipe.unet, rank, seed), half_from_each(main, auxiliary), lr_B,
                            lr_D, steps, batch_size, seed + 1, f"b4m {role}", progress,
                            main_half=MAIN_HALF[role] if split_sets else None)
    from studio.models import model_family

    base = {"SD1.x": "sd_v1", "SD2.x": "sd_v2", "SDXL": "sdxl_base_v1-0"}.get(model_family(pipe), "shapes_world_v1")
    return save_plp_adapter(out_path, trained, role, seed, {"ss_training_comment": command,
                                                            "ss_base_model_version": base})


def _scene_config(cfg: BreakConfig):
    from studio.toyworld.lora_train import LoraTrainConfig

    return LoraTrainConfig(kind=cfg.kind, subject=cfg.subject, trigger=cfg.trigger, embedding=cfg.embedding,
                           trigger_after_noun=cfg.trigger_after_noun)


def check_aux_styles(cfg: BreakConfig) -> None:
    """Auxiliary styles are a content adapter's, each a texture or palette of the shapes world."""
    from studio.toyworld.render import NOVEL_PALETTES, STYLES, TEXTURES

    if cfg.aux_styles and cfg.role != "content":
        raise StudioError("Auxiliary styles (--aux-style) are the style sets a content adapter's B learns from; a "
                          "style adapter's auxiliary sets are plain contents.")
    for style in cfg.aux_styles:
        if style not in STYLES:
            raise StudioError(f"Unknown auxiliary style {style!r}: give a texture ({', '.join(TEXTURES)}) or a "
                              f"palette ({', '.join(NOVEL_PALETTES)}).")


def break_train(pipe, cfg: BreakConfig, out_path: Path, progress: bool = True, command: str = "") -> Path:
    """Train one PLP adapter on the shapes world. Content: D on images of the concept while B (at the low
    aux rate) sees auxiliary style sets (plain scenes, one style per batch: a base texture, or `aux_styles`);
    style: B on images in the style while D (aux rate) sees plain scenes. Half of every batch is main images."""
    from studio.toyworld.lora_train import check_subject, lora_scene
    from studio.toyworld.render import BASE_TEXTURES, random_scene

    scene_cfg = _scene_config(cfg)
    check_subject(scene_cfg)
    check_aux_styles(cfg)
    aux_styles = tuple(cfg.aux_styles) or BASE_TEXTURES

    def batch_for_step(rng, step, n):
        scenes = []
        for i in range(n):
            if i % 2 == 0:  # the main images
                scenes.append(lora_scene(rng, scene_cfg))
            else:
                scene = random_scene(rng)
                for obj in scene.objects:
                    obj.wear(aux_styles[step % len(aux_styles)])
                scenes.append(scene)
        return (*render_batch(scenes, rng), [i % 2 == 0 for i in range(n)])

    if cfg.embedding:
        check_new_word(pipe.tokenizer, cfg.trigger)
    lr_B, lr_D = (cfg.aux_lr, cfg.main_lr) if cfg.role == "content" else (cfg.main_lr, cfg.aux_lr)
    trained, words = _train_plp(pipe, create_plp_adapter(pipe.unet, cfg.rank, cfg.seed), batch_for_step, lr_B,
                                lr_D, cfg.steps, cfg.batch_size, cfg.data_seed, f"b4m {cfg.role}", progress,
                                word=cfg.trigger if cfg.embedding else None, lr_word=cfg.embedding_lr,
                                main_half=MAIN_HALF[cfg.role] if cfg.split_sets else None)
    meta = {"modelspec.trigger_phrase": cfg.trigger, "ss_tag_frequency": json.dumps({"b4m": {cfg.trigger: cfg.steps}}),
            "ss_training_comment": command, "studio_b4m_config": json.dumps(asdict(cfg))}
    return save_plp_adapter(out_path, trained, cfg.role, cfg.seed, meta, embeddings=words)


def joint_finetune(pipe, fused: dict[str, PLPFactors], batch_for_step, steps: int, lr: float = 1e-4,
                   batch_size: int = 8, seed: int = 2, progress: bool = True,
                   words: dict | None = None) -> dict[str, PLPFactors]:
    """The optional joint fine-tune of "make": both learnable halves of the assembled adapter, on content images and
    style images together (`batch_for_step`, as `shapes_world_pair` or `folder_pair` gives it; the official second
    stage: lr 1e-4, 1000 steps). The adapters' learnt words (`words`, as `assembled_embeddings` gives them) are in
    the tokenizer meanwhile, unchanged."""
    from studio.lora.embeddings import add_embeddings, check_embeddings, remove_embeddings

    check_embeddings(pipe, words or {}, "the assembled adapter")
    add_embeddings(pipe, "b4m_make", words or {})
    try:
        return _train_plp(pipe, fused, batch_for_step, lr, lr, steps, batch_size, seed, "b4m make", progress)[0]
    finally:
        remove_embeddings(pipe, "b4m_make")


def shapes_world_pair(content: BreakConfig, style: BreakConfig):
    """The joint fine-tune's batches for a shapes-world pair: the content's images and the style's, half each."""
    from studio.toyworld.lora_train import lora_scene

    content_cfg, style_cfg = _scene_config(content), _scene_config(style)

    def batch_for_step(rng, step, n):
        return render_batch([lora_scene(rng, content_cfg if i % 2 == 0 else style_cfg) for i in range(n)], rng)

    return batch_for_step


def folder_pair(content: ImageFolder, style: ImageFolder):
    """The joint fine-tune's batches from two folders of images with their prompts: content and style, half each."""
    return half_from_each(content, [style])
