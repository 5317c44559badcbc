"""Break-for-Make (Xu et al., ACM TOG 2025, arXiv 2403.19456; METHODS §4): partly-learnable-projection
(PLP) adapters for content and style, and their assembly into one ordinary LoRA.

On to_q / to_k / to_v / to_out.0: up = [A; B] (rows; A frozen, B learnable), down = [C | D] (columns;
C frozen, D learnable), ΔW = [[AC, AD], [BC, BD]]. The content adapter learns D, the style adapter B;
"make" takes D from the content adapter into the style adapter: [[AC, A·D_c], [B_s·C, B_s·D_c]].
Assembly is only valid when both adapters share A and C (made from one seed); two ordinary LoRAs have
arbitrary internal bases, so they are refused.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from composers.base import Composer
from studio.engine import Session
from studio.errors import LoraError, PresetError

PLP_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
MAIN_HALF = {"content": "D", "style": "B"}  # the learnable half each role's main images teach
NOT_B4M = ("B4M assembly combines a content and a style adapter trained as B4M partly-learnable projections from "
           "one seed; {name} is an ordinary LoRA, whose internal basis is arbitrary, so the halves would not fit "
           "together. Use the merge, regional or another method for ordinary LoRAs.")


# --- PLP adapters ----------------------------------------------------------------------------------------
@dataclass
class PLPFactors:
    """One layer's factors: up = [A; B] (out × r), down = [C | D] (r × in)."""
    A: torch.Tensor  # (out_top, r) frozen
    B: torch.Tensor  # (out - out_top, r) learnable (style)
    C: torch.Tensor  # (r, in_left) frozen
    D: torch.Tensor  # (r, in - in_left) learnable (content)

    @property
    def up(self) -> torch.Tensor:
        return torch.cat([self.A, self.B], 0)

    @property
    def down(self) -> torch.Tensor:
        return torch.cat([self.C, self.D], 1)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def frozen_halves(out_features: int, in_features: int, rank: int, generator: torch.Generator):
    """A and C of one layer, from the seed: for square layers the rows of one random orthogonal basis
    (A its first out/2 rows, C the next in/2 rows, transposed); otherwise A = 0 and C random."""
    top, left = out_features // 2, in_features // 2
    if out_features == in_features:
        basis, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
        return basis[:top].clone(), basis[top:top + left].T.clone()
    return torch.zeros(top, rank), torch.randn(rank, left, generator=generator) / left ** 0.5


def create_plp_adapter(unet: nn.Module, rank: int, seed: int) -> dict[str, PLPFactors]:
    """PLP factors for every attention projection of the UNet; B and D start at zero. Two adapters made
    with one seed have identical A and C."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(PLP_TARGETS):
            A, C = frozen_halves(module.out_features, module.in_features, rank, generator)
            factors[name] = PLPFactors(A, torch.zeros(module.out_features - A.shape[0], rank), C,
                                       torch.zeros(rank, module.in_features - C.shape[1]))
    return factors


def frozen_fingerprint(factors: dict[str, PLPFactors]) -> str:
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode())
        digest.update(factors[name].A.float().numpy().tobytes())
        digest.update(factors[name].C.float().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- files -----------------------------------------------------------------------------------------------
def save_plp_adapter(path: Path, factors: dict[str, PLPFactors], role: str, seed: int, extra: dict | None = None,
                     embeddings: dict | None = None):
    """A B4M adapter is saved as an ordinary kohya LoRA (up = [A; B], down = [C | D], alpha = rank) plus
    metadata saying which halves are frozen, so that it also loads and runs on its own; a learnt trigger word
    goes with it as a bundled embedding."""
    from studio.lora.kohya_export import save_kohya

    modules = {("unet", name): (f.down, f.up, float(f.A.shape[1])) for name, f in factors.items()}
    meta = {"b4m_role": role, "b4m_seed": str(seed), "b4m_frozen": frozen_fingerprint(factors),
            "b4m_splits": json.dumps({n: [f.A.shape[0], f.C.shape[1]] for n, f in factors.items()}),
            "ss_base_model_version": "shapes_world_v1"}
    meta.update(extra or {})
    return save_kohya(path, modules, meta, dtype=torch.float32, embeddings=embeddings)


def read_plp_adapter(path: Path) -> tuple[dict[str, PLPFactors], dict]:
    from studio.lora import load_lora

    weights = load_lora(path)
    meta = weights.info.metadata
    if "b4m_role" not in meta:
        raise LoraError(NOT_B4M.format(name=Path(path).name))
    splits = json.loads(meta["b4m_splits"])
    factors = {}
    for (component, target), module in weights.modules.items():
        top, left = splits[target]
        up, down = module.up, module.down
        factors[target] = PLPFactors(up[:top], up[top:], down[:, :left], down[:, left:])
    return factors, meta


def assemble(content_path: Path, style_path: Path, out_path: Path | None = None) -> dict[str, PLPFactors]:
    """"Make": the style adapter with the content adapter's D: ΔW = [[AC, A·D_c], [B_s·C, B_s·D_c]]."""
    content, content_meta = read_plp_adapter(content_path)
    style, style_meta = read_plp_adapter(style_path)
    if content_meta["b4m_role"] != "content" or style_meta["b4m_role"] != "style":
        raise LoraError(f"B4M assembly needs a content adapter and a style adapter; {Path(content_path).name} is "
                        f"{content_meta['b4m_role']} and {Path(style_path).name} is {style_meta['b4m_role']}.")
    if content_meta["b4m_frozen"] != style_meta["b4m_frozen"] or set(content) != set(style) or not all(
            torch.equal(content[n].A, style[n].A) and torch.equal(content[n].C, style[n].C) for n in content):
        raise LoraError(f"{Path(content_path).name} and {Path(style_path).name} were not created from the same seed "
                        "(their frozen halves A and C differ), so they cannot be assembled.")
    fused = {n: PLPFactors(style[n].A, style[n].B, style[n].C, content[n].D) for n in content}
    if out_path is not None:
        _save_assembled(out_path, fused, content_path, style_path, content_meta)
    return fused


def _save_assembled(out_path: Path, fused: dict[str, PLPFactors], content_path: Path, style_path: Path,
                    content_meta: dict, words: dict | None = None, extra: dict | None = None) -> Path:
    """`words`: as `assembled_embeddings` gives them (read from the pair when not given)."""
    return save_plp_adapter(out_path, fused, "assembled", int(content_meta["b4m_seed"]),
                            {"b4m_content": Path(content_path).name, "b4m_style": Path(style_path).name,
                             "ss_base_model_version": content_meta.get("ss_base_model_version", "shapes_world_v1"),
                             **(extra or {})},
                            embeddings=assembled_embeddings(content_path, style_path) if words is None else words)


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
    return _save_assembled(out_path, fused, content_path, style_path, content_meta, words,
                           {"b4m_finetune_steps": str(finetune_steps), "ss_training_comment": command})


def assembled_embeddings(content_path: Path, style_path: Path) -> dict:
    """The words both adapters bring (a learnt trigger each, if any): the assembled adapter brings them all."""
    from studio.lora import load_lora

    content, style = load_lora(content_path).embeddings, load_lora(style_path).embeddings
    shared = sorted(content.keys() & style.keys())
    if shared:
        raise LoraError(f"{Path(content_path).name} and {Path(style_path).name} both bring the word {shared[0]!r}, "
                        "so the assembled adapter cannot give it one meaning.")
    return {**content, **style}


def assembled_weights(fused: dict[str, PLPFactors], info, embeddings: dict | None = None):
    """The assembled adapter as one ordinary LoRA (`LoraWeights`, scale 1) for `attach_lora`, with the words
    of both adapters when given (not when the two adapters are attached beside it and bring them already)."""
    from studio.lora.weights import LoraModule, LoraWeights

    return LoraWeights("b4m_assembled", info, {("unet", n): LoraModule("unet", n, f.down, f.up, None, None, 1.0)
                                               for n, f in fused.items()}, embeddings or {})


# --- break: training one adapter ---------------------------------------------------------------------------
class PLPLinear(nn.Module):
    """A Linear with a PLP adapter whose learnable halves are parameters (training only)."""

    def __init__(self, base: nn.Linear, factors: PLPFactors):
        super().__init__()
        self.base = base
        self.register_buffer("A", factors.A.clone())
        self.register_buffer("C", factors.C.clone())
        self.B = nn.Parameter(factors.B.clone())
        self.D = nn.Parameter(factors.D.clone())

    def forward(self, x):
        up = torch.cat([self.A, self.B], 0).to(x.dtype)  # fp32 halves, computed in the model's dtype
        down = torch.cat([self.C, self.D], 1).to(x.dtype)
        return self.base(x) + F.linear(F.linear(x, down), up)

    def factors(self) -> PLPFactors:
        return PLPFactors(self.A.detach().clone(), self.B.detach().clone(), self.C.detach().clone(),
                          self.D.detach().clone())


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


def _wrap(unet: nn.Module, factors: dict[str, PLPFactors]) -> dict[str, PLPLinear]:
    from studio.lora.inject import replace_module

    wrapped = {}
    for name, f in factors.items():
        base = unet.get_submodule(name)
        wrapped[name] = PLPLinear(base, f).to(base.weight.device)
        replace_module(unet, name, wrapped[name])
    return wrapped


def _unwrap(unet: nn.Module, wrapped: dict[str, PLPLinear]) -> None:
    from studio.lora.inject import replace_module

    for name, layer in wrapped.items():
        replace_module(unet, name, layer.base)


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
    from studio.toyworld.lora_train import TriggerWord
    from studio.toyworld.train import encode_latents

    unet, vae = pipe.unet, pipe.vae
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    wrapped, trigger = _wrap(unet, factors), None
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
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=gen)
            t = t.to(latents.device)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond.embeds,
                        added_cond_kwargs=cond.added).sample
            target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, t)
            opt.zero_grad(set_to_none=True)
            if main_half is None:
                F.mse_loss(pred.float(), target.float()).backward()
            else:
                is_main = torch.as_tensor(main[0], dtype=torch.bool, device=pred.device)
                per_image = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
                main_params = halves[main_half] + ([trigger.table] if trigger is not None else [])
                other_params = halves["D" if main_half == "B" else "B"]
                for params, chosen in ((main_params, is_main), (other_params, ~is_main)):
                    if chosen.any():
                        grads = torch.autograd.grad(per_image[chosen].mean(), params, retain_graph=True,
                                                    allow_unused=True)
                        for param, grad in zip(params, grads):
                            param.grad = grad
            opt.step()
        trained = {name: layer.factors() for name, layer in wrapped.items()}
    finally:
        _unwrap(unet, wrapped)
        words = {word: {"text_encoder": trigger.finish()}} if trigger is not None else {}  # tokenizer as it was
    return trained, words


def _render_batch(scenes, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    from studio.toyworld.render import image_to_tensor_array, render

    images = np.stack([image_to_tensor_array(render(s, rng.randrange(1 << 30))) for s in scenes])
    return torch.from_numpy(images), [s.caption() for s in scenes]


class ImageFolder:
    """A few images with their prompts: every .png/.jpg/.jpeg/.webp in a folder, its caption in a .txt
    file of the same name (the kohya convention), else `caption`; resized and centre-cropped to `size`."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, folder: Path, size: int, caption: str | None = None):
        from studio.errors import StudioError

        if not Path(folder).is_dir():
            raise StudioError(f"{folder} is not a folder of images.")
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.SUFFIXES)
        if not self.files:
            raise StudioError(f"{folder} holds no images (.png, .jpg, .jpeg, .webp).")
        missing = [p.name for p in self.files if not p.with_suffix(".txt").exists()]
        if missing and caption is None:
            raise StudioError(f"{missing[0]} in {folder} has no caption file ({Path(missing[0]).stem}.txt) and no "
                              "default caption was given.")
        self.size, self.caption = size, caption

    def sample(self, rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
        from PIL import Image, ImageOps

        images, captions = [], []
        for path in (rng.choice(self.files) for _ in range(n)):
            image = ImageOps.fit(Image.open(path).convert("RGB"), (self.size, self.size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            images.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
            text = path.with_suffix(".txt")
            captions.append(text.read_text().strip() if text.exists() else self.caption)
        return torch.from_numpy(np.stack(images)), captions


def _half_from_each(main: ImageFolder, others: list[ImageFolder]):
    """Batches of which half comes from `main` and half from one of `others` in turn (none: all from `main`), with
    which images are main."""
    def batch_for_step(rng, step, n):
        half = max(1, n // 2)
        images, captions = main.sample(rng, half)
        if others and n > half:
            other_images, other_captions = others[step % len(others)].sample(rng, n - half)
            images, captions = torch.cat([images, other_images]), captions + other_captions
        return images, captions, [i < half for i in range(len(captions))]

    return batch_for_step


def break_train_folders(pipe, role: str, main: ImageFolder, auxiliary: list[ImageFolder], out_path: Path,
                        seed: int = 7, rank: int = 64, steps: int = 500, batch_size: int = 2,
                        main_lr: float = 1e-4, aux_lr: float = 1e-5, progress: bool = True, command: str = "",
                        split_sets: bool = False) -> Path:
    """"Break" on a real model: the content adapter learns D on the content images (official lr 1e-4)
    while B sees the auxiliary style sets (1e-5); the style adapter is the mirror image. Half of every
    batch comes from the main images, half from one auxiliary set in turn. `split_sets`: each half learns
    only from its own images (`BreakConfig.split_sets`)."""
    lr_B, lr_D = (aux_lr, main_lr) if role == "content" else (main_lr, aux_lr)
    trained, _ = _train_plp(pipe, create_plp_adapter(pipe.unet, rank, seed), _half_from_each(main, auxiliary), lr_B,
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
        raise ValueError("auxiliary styles (--aux-style) are the style sets a content adapter's B learns from; a style "
                         "adapter's auxiliary sets are plain contents")
    for style in cfg.aux_styles:
        if style not in STYLES:
            raise ValueError(f"unknown auxiliary style {style!r}: give a texture ({', '.join(TEXTURES)}) or a palette "
                             f"({', '.join(NOVEL_PALETTES)})")


def break_train(pipe, cfg: BreakConfig, out_path: Path, progress: bool = True, command: str = "") -> Path:
    """Train one PLP adapter on the shapes world. Content: D on images of the concept while B (at the low
    aux rate) sees auxiliary style sets (plain scenes, one style per batch: a base texture, or `aux_styles`);
    style: B on images in the style while D (aux rate) sees plain scenes. Half of every batch is main images."""
    from studio.toyworld.lora_train import check_new_word, check_subject, lora_scene
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
        return (*_render_batch(scenes, rng), [i % 2 == 0 for i in range(n)])

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
        return _render_batch([lora_scene(rng, content_cfg if i % 2 == 0 else style_cfg) for i in range(n)], rng)

    return batch_for_step


def folder_pair(content: ImageFolder, style: ImageFolder):
    """The joint fine-tune's batches from two folders of images with their prompts: content and style, half each."""
    return _half_from_each(content, [style])


# --- the composer ----------------------------------------------------------------------------------------
class B4MParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="Weight of the assembled adapter.")


class B4MComposer(Composer):
    name = "b4m"
    summary = ("Break-for-Make: assemble a B4M content adapter and a B4M style adapter (same seed) into one "
               "LoRA, or run one made by `studio b4m make`; refuses ordinary LoRAs.")
    passes_doc = "1 (the assembled adapter is one ordinary LoRA)"
    Params = B4MParams

    def setup(self, session: Session) -> None:
        from studio.lora.inject import attach_lora, attached_adapters, set_lora_weights

        self.fused, self._restore = None, None
        if not session.adapters:
            return super().setup(session)
        roles = {name: session.loras[name].info.metadata.get("b4m_role") for name in session.adapters}
        for name, role in roles.items():
            if role is None:
                raise PresetError(NOT_B4M.format(name=Path(session.adapters[name].file).name))
        self._restore = attached_adapters(session.pipe)
        if list(roles.values()) == ["assembled"]:  # made already, e.g. with the joint fine-tune: attached as it is
            set_lora_weights(session.pipe, {name: self.params.weight for name in roles})
            return super().setup(session)
        content = [n for n, r in roles.items() if r == "content"]
        style = [n for n, r in roles.items() if r == "style"]
        if len(content) != 1 or len(style) != 1 or len(roles) != 2:
            raise PresetError("The b4m method needs one B4M content adapter and one B4M style adapter, which it "
                              "assembles, or one adapter made by `studio b4m make`.")
        self.fused = assemble(Path(session.adapters[content[0]].file), Path(session.adapters[style[0]].file))
        # the assembled adapter replaces the two: both set to weight 0, the fused one attached
        set_lora_weights(session.pipe, {name: 0.0 for name in session.adapters})
        first = session.loras[content[0]]
        attach_lora(session.pipe, assembled_weights(self.fused, first.info), "b4m_assembled", self.params.weight)
        self.cond = session.encode([session.prompt], [session.negative_prompt], text_adapters=[])

    def teardown(self, session: Session) -> None:
        from studio.lora.inject import detach_lora, set_lora_weights

        if self.fused is not None:
            detach_lora(session.pipe, "b4m_assembled")
        if self._restore is not None:
            set_lora_weights(session.pipe, self._restore)
