"""The project's own LoRA trainer for the shapes world (diffusers + PEFT), saving kohya-format files with
`ss_*` metadata and trigger words.

A concept LoRA teaches a shape the base model never saw (every training scene holds it, named by the
trigger word); a style LoRA teaches a texture or a palette it never saw (every object wears it, the trigger
word in the texture's place). Half of each batch are ordinary scenes with ordinary captions (prior preservation),
so the LoRA leaves ordinary prompts alone.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from studio.errors import StudioError
from studio.training import command_line

from studio.toyworld.render import (BASE_SHAPES, NOVEL_SHAPES, SLOTS, STYLES, Scene, image_to_tensor_array,
                                    random_object, random_scene, render)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoraTrainConfig:
    kind: str  # "concept" | "style"
    subject: str  # a novel shape (concept) or a novel texture (style)
    trigger: str
    steps: int = 800
    batch_size: int = 16
    rank: int = 8
    alpha: float = 8.0
    lr: float = 1e-3
    text_encoder: bool = True
    prior_fraction: float = 0.5
    object_weight: float = 1.0  # loss weight inside the objects' boxes, relative to the background
    embedding: bool = False  # also learn the trigger as a new word of the tokenizer (pivotal tuning)
    embedding_lr: float = 5e-3  # its rate (decays as lr does)
    seed: int = 0
    trigger_after_noun: bool = False  # a style trigger right after the noun ("a large red star sepx ...")


def lora_scene(rng: random.Random, cfg: LoraTrainConfig) -> Scene:
    if cfg.kind == "concept":
        n = rng.choice((1, 1, 2))
        slots = rng.sample(SLOTS, n)
        objects = [random_object(rng, shapes=(cfg.subject,), slot=slots[0], allow_held_out=True)]
        objects += [random_object(rng, slot=s) for s in slots[1:]]
        return Scene(objects, rng.choice(("white", "grey", "black")), triggers={cfg.subject: cfg.trigger})
    scene = random_scene(rng, allow_held_out=True)
    for obj in scene.objects:
        obj.wear(cfg.subject)
    scene.triggers = {cfg.subject: cfg.trigger}
    scene.learnt_triggers = cfg.embedding
    scene.trigger_after_noun = cfg.trigger_after_noun
    return scene


def training_batch(cfg: LoraTrainConfig, step: int):
    rng = random.Random(cfg.seed * 1_000_003 + step)
    scenes = [random_scene(rng) if rng.random() < cfg.prior_fraction else lora_scene(rng, cfg)
              for _ in range(cfg.batch_size)]
    images = np.stack([image_to_tensor_array(render(s, rng.randrange(1 << 30))) for s in scenes])
    return torch.from_numpy(images), [s.caption() for s in scenes], scenes


def object_loss_weights(scenes: list[Scene], size: int, object_weight: float) -> torch.Tensor:
    """(B, 1, size, size) loss weights: `object_weight` inside every object's ground-truth box, 1 elsewhere.
    An object covers 2–8 % of the image, so with a plain mean the flat background, not the texture or the
    outline the LoRA is meant to learn, makes most of the loss."""
    weights = torch.ones(len(scenes), 1, size, size)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            weights[i, 0, int(y0 * size):math.ceil(y1 * size), int(x0 * size):math.ceil(x1 * size)] = object_weight
    return weights


def peft_modules(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            found[name] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach())
    return found


def train_lora(pipe, cfg: LoraTrainConfig, out_path: Path, progress: bool = True, command: str | None = None) -> Path:
    from peft import LoraConfig

    from studio.lora.kohya_export import save_kohya
    from studio.toyworld.model import train_scheduler
    from studio.toyworld.train import encode_latents
    from studio.training.step import denoising_loss
    from studio.training.words import TriggerWord, check_new_word

    check_subject(cfg)
    if not cfg.object_weight > 0:
        raise StudioError(f"The object weight must be above 0, not {cfg.object_weight:g}.")
    if cfg.embedding and not cfg.embedding_lr > 0:
        raise StudioError(f"The embedding's learning rate must be above 0, not {cfg.embedding_lr:g}.")
    if not 0 <= cfg.prior_fraction < 1:
        raise StudioError(f"The prior fraction must be at least 0 and below 1 (1 would leave no scene of the "
                          f"subject), not {cfg.prior_fraction:g}.")
    if cfg.embedding:
        check_new_word(pipe.tokenizer, cfg.trigger)
    torch.manual_seed(cfg.seed)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=UNET_TARGETS,
                                init_lora_weights="gaussian"))
    if cfg.text_encoder:
        text_encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=TEXT_TARGETS,
                                            init_lora_weights="gaussian"))
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": 1e-4, "lr": cfg.lr, "initial_lr": cfg.lr}]
    if cfg.embedding:
        word = TriggerWord(pipe, cfg.trigger)
        groups.append({"params": [word.table], "weight_decay": 0.0, "lr": cfg.embedding_lr,
                       "initial_lr": cfg.embedding_lr})
    opt = torch.optim.AdamW(groups)
    noise_scheduler = train_scheduler()
    unet.train()
    bar = tqdm(range(cfg.steps), desc=f"lora {cfg.trigger}", disable=not progress)
    for step in bar:
        images, captions, scenes = training_batch(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        latents = encode_latents(vae, images)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        weights = object_loss_weights(scenes, latents.shape[-1], cfg.object_weight)  # all 1: the plain mean
        loss = denoising_loss(unet, noise_scheduler, latents, text_encoder(ids)[0], gen, weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # linear decay to 10 %
            group["lr"] = group["initial_lr"] * (1.0 - 0.9 * step / cfg.steps)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    embeddings = {cfg.trigger: {"text_encoder": word.finish()}} if cfg.embedding else {}
    modules = {("unet", name): (down, up, cfg.alpha) for name, (down, up) in peft_modules(unet).items()}
    if cfg.text_encoder:
        modules.update({("text_encoder", name): (down, up, cfg.alpha)
                        for name, (down, up) in peft_modules(text_encoder).items()})
    metadata = {
        "ss_base_model_version": "shapes_world_v1", "ss_output_name": out_path.stem,
        "ss_tag_frequency": {f"shapes_{cfg.kind}": {cfg.trigger: cfg.steps * cfg.batch_size}},
        "modelspec.trigger_phrase": cfg.trigger, "modelspec.title": f"{cfg.subject} ({cfg.kind})",
        "ss_training_comment": command or train_lora_command(cfg, out_path),
        "studio_train_config": json.dumps(asdict(cfg)),
    }
    # back to the pipeline as it was: PEFT's wrapper modules out, not only the adapter's weights
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for model in (unet, text_encoder):
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False
    return save_kohya(out_path, modules, metadata, embeddings=embeddings)


def check_subject(cfg: LoraTrainConfig) -> None:
    """A concept teaches a shape, a style a texture or a palette, and only a style's trigger can stand after the
    noun; anything else is refused before training."""
    if cfg.kind == "concept" and cfg.subject not in NOVEL_SHAPES + BASE_SHAPES:
        raise StudioError(f"Unknown shape {cfg.subject!r}: give one of {', '.join(NOVEL_SHAPES + BASE_SHAPES)}.")
    if cfg.kind == "style" and cfg.subject not in STYLES:
        raise StudioError(f"Unknown texture or palette {cfg.subject!r}: give one of {', '.join(STYLES)}.")
    if cfg.trigger_after_noun and cfg.kind != "style":
        raise StudioError(f"Only a style's trigger can stand after the noun (--trigger-after-noun); the {cfg.kind}'s "
                          f"trigger {cfg.trigger!r} is the noun itself.")


def train_lora_command(cfg: LoraTrainConfig, out_path: Path) -> str:
    """The `studio toyworld train-lora` command that makes this file: the options that make it, defaults left out
    except the ones every file names."""
    default = LoraTrainConfig(cfg.kind, cfg.subject, cfg.trigger)
    return command_line("studio toyworld train-lora", {
        "kind": cfg.kind, "subject": cfg.subject, "trigger": cfg.trigger, "out": out_path, "steps": cfg.steps,
        "rank": cfg.rank, "seed": cfg.seed, "lr": cfg.lr,
        "object_weight": cfg.object_weight if cfg.object_weight != default.object_weight else None,
        "prior_fraction": cfg.prior_fraction if cfg.prior_fraction != default.prior_fraction else None,
        "unet_only": not cfg.text_encoder, "embedding": cfg.embedding,
        "embedding_lr": cfg.embedding_lr if cfg.embedding and cfg.embedding_lr != default.embedding_lr else None,
        "trigger_after_noun": cfg.trigger_after_noun})
