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
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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

    check_subject(cfg)
    if not cfg.object_weight > 0:
        raise ValueError(f"the object weight must be above 0, not {cfg.object_weight:g}")
    if cfg.embedding and not cfg.embedding_lr > 0:
        raise ValueError(f"the embedding's learning rate must be above 0, not {cfg.embedding_lr:g}")
    if not 0 <= cfg.prior_fraction < 1:
        raise ValueError(f"the prior fraction must be at least 0 and below 1 (1 would leave no scene of the "
                         f"subject), not {cfg.prior_fraction:g}")
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
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        weights = object_loss_weights(scenes, latents.shape[-1], cfg.object_weight)  # all 1: the plain mean
        loss = ((pred - noise_scheduler.get_velocity(latents, noise, t)) ** 2 * weights).mean() / weights.mean()
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
        "ss_training_comment": command or "studio toyworld train-lora " + " ".join(
            shlex.quote(a) for a in sys.argv[3:]),
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
        raise ValueError(f"unknown shape {cfg.subject!r}")
    if cfg.kind == "style" and cfg.subject not in STYLES:
        raise ValueError(f"unknown texture or palette {cfg.subject!r}")
    if cfg.trigger_after_noun and cfg.kind != "style":
        raise ValueError(f"only a style's trigger can stand after the noun (--trigger-after-noun); the {cfg.kind}'s "
                         f"trigger {cfg.trigger!r} is the noun itself")


def check_new_word(tokenizer, trigger: str) -> None:
    if trigger in tokenizer.get_vocab() or not trigger.isalnum():
        raise ValueError(f"a learnt embedding needs a made-up word of letters and digits as its trigger, and "
                         f"{trigger!r} is not one (it is a token of the tokenizer already, or not one word)")


class TriggerWord:
    """The trigger as a new token of the pipeline's tokenizer, its input embedding learnt with the LoRA
    (pivotal tuning; kohya and A1111 bundle it in the LoRA file). It starts at the mean of the embeddings
    of the pieces the tokenizer split the word into; only its row of the embedding table trains.
    `finish()` returns the learnt vector (1, width) and removes the token again. Callers refuse a trigger
    that is no new word (`check_new_word`) before they touch the pipeline."""

    def __init__(self, pipe, trigger: str):
        self.pipe, self.trigger = pipe, trigger
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        pieces = tokenizer(trigger, add_special_tokens=False).input_ids
        start = encoder.get_input_embeddings().weight.detach()[pieces].mean(0, keepdim=True)
        pipe.load_textual_inversion(start, token=trigger, tokenizer=tokenizer, text_encoder=encoder)
        self.table = encoder.get_input_embeddings().weight
        self.row = tokenizer.convert_tokens_to_ids(trigger)
        only_row = torch.zeros(self.table.shape[0], 1, dtype=self.table.dtype)
        only_row[self.row] = 1
        self.table.requires_grad_(True)
        self._hook = self.table.register_hook(lambda grad: grad * only_row)

    def finish(self) -> torch.Tensor:
        from studio.lora.embeddings import unload_words

        self._hook.remove()
        self.table.requires_grad_(False)
        vector = self.table.detach()[self.row:self.row + 1].clone()
        unload_words(self.pipe, "text_encoder", [self.trigger])
        self.pipe.text_encoder.get_input_embeddings().requires_grad_(False)  # a new table: frozen as the rest was
        return vector
