"""Training of the bundled default model: a factor-2 VAE, then the UNet and text encoder jointly.

Seeded and resumable: every batch is drawn from a generator seeded by (seed, step), and a checkpoint
(weights, EMA, optimiser, step) is written every `checkpoint_every` steps, so re-running the same
command continues from the last checkpoint and draws the same data it would have drawn.
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attention.controller import CompositionController
from attention.processors import install_processors
from attention.store import AttentionStore
from studio.errors import StudioError
from studio.toyworld import model as toymodel
from studio.toyworld.grounding import grounded_layers, object_token_positions, token_grounding_loss
from studio.toyworld.render import NOVEL_PALETTES, SHAPES, TEXTURES, image_to_tensor_array, random_scene, render
from studio.training.step import denoising_loss


@dataclass
class BaseTrainConfig:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    steps: int = 20000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    # > 0: the VAE's latent means are pulled towards the image's 2× average-pooled thumbnail (RGB, and 0
    # in the fourth channel), so that the UNet denoises a pixel-like 32×32 image (as the probe of this
    # world did in pixel space) and the decoder is a learnt 2× upsampler; 0: a free latent.
    vae_thumbnail_weight: float = 0.0
    # > 0: the learning rate falls along a half cosine to 0 over the last `decay_steps` of `steps` (constant
    # before), so a run continued with a decay from a constant-rate checkpoint is the same run as one started
    # with it. A constant rate leaves the weights wandering: at 6,750 and 8,000 steps the judge scored 9 % and 3 %.
    decay_steps: int = 0
    # > 0: TokenCompose's token loss (studio/toyworld/grounding.py) with this weight, from step `grounding_start`
    # on (so it may be added to a run that has a checkpoint: the steps before are those of a run without it).
    grounding_weight: float = 0.0
    grounding_start: int = 0
    # The step the optimiser state started at (a run continued `--init-from` an exported model starts a fresh
    # AdamW there, whose first updates are as large as the learning rate in every weight: it warms up again).
    warmup_start: int = 0


def learning_rate(cfg: BaseTrainConfig, step: int) -> float:
    """Linear warm-up, constant, then (with `decay_steps`) a half-cosine to 0 at `cfg.steps`."""
    lr = cfg.lr * min(1.0, (step - cfg.warmup_start + 1) / cfg.warmup)
    decay_start = cfg.steps - cfg.decay_steps
    if cfg.decay_steps > 0 and step >= decay_start:
        lr *= 0.5 * (1 + np.cos(np.pi * (step - decay_start) / cfg.decay_steps))
    return float(lr)


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The diffusion model's training latents: the VAE posterior's mean, scaled. Its samples would add
    noise as large as the signal (posterior std 0.62 against 0.66 for the means: with a KL weight of
    1e-6 the decoder learnt to ignore it), which no denoiser can predict."""
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def thumbnail_latent_target(images: torch.Tensor) -> torch.Tensor:
    """What a thumbnail VAE's latent means are pulled towards: the 2× average-pooled image, 0 in channel 4."""
    thumbnail = F.avg_pool2d(images, 2)
    return torch.cat([thumbnail, torch.zeros_like(thumbnail[:, :1])], dim=1)


def render_scenes(seed: int, step: int, batch_size: int, **scene_kwargs):
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [random_scene(rng, **scene_kwargs) for _ in range(batch_size)]
    images = np.stack([image_to_tensor_array(render(s, rng.randrange(1 << 30))) for s in scenes])
    return torch.from_numpy(images), scenes


def render_batch(seed: int, step: int, batch_size: int, **scene_kwargs):
    images, scenes = render_scenes(seed, step, batch_size, **scene_kwargs)
    return images, [s.caption() for s in scenes]


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up of the EMA (as in diffusers' EMAModel)
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def cosine_to_5_percent(lr: float, fraction: float) -> float:
    """The VAE trainings' learning rate: a half cosine from `lr` down to 5 % of it as `fraction` goes 0 → 1."""
    return float(lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * fraction))))


def train_vae(workdir: Path, cfg: BaseTrainConfig, progress: bool = True, init_from: Path | None = None):
    """Train (or load: from the workdir, else from an exported pipeline) the factor-2 VAE; returns it
    frozen, with its scaling factor set."""
    from diffusers import AutoencoderKL

    done = workdir / "vae"
    if (done / "config.json").exists():
        return AutoencoderKL.from_pretrained(str(done)).eval().requires_grad_(False)
    if init_from is not None:
        vae = AutoencoderKL.from_pretrained(str(init_from), subfolder="vae", dtype=torch.float32)
        vae.save_pretrained(str(done))
        report = json.loads((Path(init_from) / "training.json").read_text()).get("vae")
        if report is not None:
            (workdir / "vae_report.json").write_text(json.dumps(report))
        return vae.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    vae = toymodel.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        images, _ = render_batch(cfg.seed + 7, step, cfg.vae_batch_size)
        posterior = vae.encode(images).latent_dist
        if cfg.vae_thumbnail_weight > 0:
            target = thumbnail_latent_target(images)
            # small noise on the means: the decoder must forgive a denoiser's small errors
            latents = posterior.mean + 0.05 * torch.randn_like(posterior.mean)
            recon = vae.decode(latents).sample
            loss = (F.l1_loss(recon, images) + F.mse_loss(recon, images)
                    + cfg.vae_thumbnail_weight * F.mse_loss(posterior.mean, target))
        else:
            recon = vae.decode(posterior.sample()).sample
            loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = cosine_to_5_percent(cfg.vae_lr, step / cfg.vae_steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    scaling, mae = vae_report(vae, cfg.seed)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(str(done))
    (workdir / "vae_report.json").write_text(json.dumps({"scaling_factor": scaling, "recon_mae_0_255": mae}))
    return vae


def vae_report(vae, seed: int) -> tuple[float, float]:
    """The scaling factor that gives a VAE's latent means unit std, and its reconstruction error (mean absolute,
    0–255) on 256 fresh renders."""
    with torch.no_grad():
        images, _ = render_batch(seed + 11, 0, 256)
        latents = vae.encode(images).latent_dist.mean
        recon = vae.decode(latents).sample
    return float(1.0 / latents.std()), float((recon - images).abs().mean() * 127.5)


@dataclass
class DecoderTuneConfig:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 5e-4
    # noise on the latent means, × their std: the decoder must forgive a denoiser's small errors
    latent_noise: float = 0.05
    seed: int = 0
    # True: its renders also show the shapes and textures only the example LoRAs teach. The decoder is the codec
    # every LoRA draws through (as SD's VAE was trained on far more than any one fine-tune draws); the UNet and
    # text encoder never see them. Measured: decoded by a decoder tuned on the base world only, 3 of 32 checkered
    # and 6 of 32 ringed renders kept their texture, which capped the style LoRAs below their bar.
    all_subjects: bool = True
    # True: and objects in the palettes only the example style LoRAs teach (decoded by a decoder that never saw
    # them, dark sepia came back green).
    palettes: bool = False


def tune_decoder(vae, cfg: DecoderTuneConfig, progress: bool = True) -> dict:
    """Train a trained VAE's decoder on, its encoder frozen: the latents the UNet learnt to draw stay where they
    are, and only the way they are drawn in pixels gets sharper. In place; returns what `training.json` records."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    torch.manual_seed(cfg.seed)
    _, mae_before = vae_report(vae, cfg.seed)
    vae.train()
    subjects = dict(shapes=SHAPES, textures=TEXTURES, allow_held_out=True) if cfg.all_subjects else {}
    if cfg.palettes:
        subjects["palettes"] = NOVEL_PALETTES
    bar = tqdm(range(cfg.steps), desc="decoder", disable=not progress)
    for step in bar:
        images, _ = render_batch(cfg.seed + 13, step, cfg.batch_size, **subjects)
        with torch.no_grad():
            means = vae.encode(images).latent_dist.mean
        recon = vae.decode(means + cfg.latent_noise * means.std() * torch.randn_like(means)).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = cosine_to_5_percent(cfg.lr, (step + 1) / cfg.steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    _, mae_after = vae_report(vae, cfg.seed)
    return {**asdict(cfg), "command": "studio toyworld tune-decoder", "recon_mae_0_255_before": mae_before,
            "recon_mae_0_255": mae_after}


def load_vae(folder: Path):
    """A VAE folder's AutoencoderKL in fp32, or one sentence saying why its weights could not be loaded."""
    from diffusers import AutoencoderKL

    from studio.errors import ModelNotAvailable

    try:
        return AutoencoderKL.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelNotAvailable(f"The VAE in {folder} could not be loaded "
                                f"({str(exc).splitlines()[0].strip().rstrip('.')}).") from exc


def tune_model_decoder(model_dir: Path, cfg: DecoderTuneConfig, progress: bool = True) -> dict:
    """`tune_decoder` on an exported model's VAE, written back in place (fp16, as `export` writes it) and recorded
    in its `training.json` under `decoder_tuned` (one entry per tuning). The folder is changed only once the
    tuning is done: an interrupted tuning leaves the model as it was."""
    import shutil

    model_dir = Path(model_dir)
    record = exported_model_record(model_dir, ("vae",))
    vae = load_vae(model_dir / "vae")
    tuning = tune_decoder(vae, cfg, progress)
    staged, old = model_dir / ".vae-tuned", model_dir / ".vae-before-tuning"
    shutil.rmtree(staged, ignore_errors=True), shutil.rmtree(old, ignore_errors=True)
    vae.to(torch.float16).save_pretrained(str(staged), safe_serialization=True)
    (model_dir / "vae").replace(old)
    staged.replace(model_dir / "vae")
    shutil.rmtree(old)
    record["decoder_tuned"] = [*record.get("decoder_tuned", []), tuning]
    (model_dir / "training.json").write_text(json.dumps(record, indent=1))
    return tuning


def resumed_config(workdir: Path, cfg: BaseTrainConfig) -> BaseTrainConfig:
    """A run that has a checkpoint keeps the recipe it was started with (only its length and the length of its
    final decay may change, until the decay has begun; grounding may be added from the checkpoint's step on); fields it predates take the
    value they had then (0.0 thumbnail weight: a free latent; no grounding)."""
    saved = workdir / "config.json"
    if not (workdir / "checkpoint.pt").exists() or not saved.exists():
        return cfg
    recorded = json.loads(saved.read_text())
    recorded.setdefault("vae_thumbnail_weight", 0.0)
    recorded.setdefault("grounding_weight", 0.0)
    recorded.setdefault("grounding_start", 0)
    recorded.setdefault("decay_steps", 0)
    recorded.setdefault("warmup_start", 0)
    step = checkpoint_step(workdir)
    decaying_since = recorded["steps"] - recorded["decay_steps"]
    if not (recorded["decay_steps"] > 0 and step > decaying_since):
        # a run already in its decay keeps its length: lengthened, it would not be the run its recipe describes
        recorded["steps"], recorded["decay_steps"] = cfg.steps, cfg.decay_steps
    asked, kept = (cfg.grounding_weight, cfg.grounding_start), (recorded["grounding_weight"], recorded["grounding_start"])
    if asked != kept:
        grounded_already = kept[0] > 0 and kept[1] < step
        if not grounded_already and (asked[0] == 0 or asked[1] >= step):
            recorded["grounding_weight"], recorded["grounding_start"] = asked
    return BaseTrainConfig(**recorded)


def checkpoint_step(workdir: Path) -> int:
    return int(torch.load(workdir / "checkpoint.pt", weights_only=True, mmap=True)["step"])


def train_base(workdir: Path, tokenizer_dir: Path, cfg: BaseTrainConfig, export_dir: Path | None = None,
               progress: bool = True, max_minutes: float | None = None, init_from: Path | None = None,
               warm_start: Path | None = None):
    """Train, or continue: from the workdir's checkpoint, else (`init_from`) from an exported pipeline's
    weights and step count (the optimiser state starts afresh). `warm_start`: a new run (its own VAE, from step
    0) whose UNet and text encoder start from an exported pipeline's weights instead of random ones."""
    if init_from is not None and warm_start is not None:
        raise StudioError("init_from continues a model with its VAE; warm_start begins a new run with a new VAE: "
                          "give one of them.")
    fresh = not (workdir / "checkpoint.pt").exists()
    if fresh and init_from is not None:
        origin = exported_model_record(Path(init_from), ("unet", "text_encoder", "vae"))
    elif fresh and warm_start is not None:
        origin = exported_model_record(Path(warm_start), ("unet", "text_encoder"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = resumed_config(workdir, cfg)
    (workdir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    vae = train_vae(workdir, cfg, progress, init_from)
    tokenizer = toymodel.build_tokenizer(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    unet, text_encoder = toymodel.build_unet(), toymodel.build_text_encoder()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    start = 0
    ckpt_path = workdir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        ema_unet.shadow, ema_text.shadow = ckpt["ema_unet"], ckpt["ema_text"]
        start = ckpt["step"]
    elif init_from is not None or warm_start is not None:
        source = Path(init_from if init_from is not None else warm_start)
        load_exported_weights(source, unet, text_encoder)
        ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
        # how the weights it starts from were made: an exported model of this run then names its whole lineage
        if init_from is not None:
            start = origin["steps"]
            (workdir / "continued_from.json").write_text(json.dumps(origin, indent=1))
            cfg = replace(cfg, warmup_start=start)
            (workdir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        else:
            (workdir / "warm_started_from.json").write_text(json.dumps(origin, indent=1))
    noise_scheduler = toymodel.train_scheduler()
    store = None
    if cfg.grounding_weight > 0:
        layers = grounded_layers(unet)
        store = AttentionStore(set(), keep_grad=True)
        install_processors(unet, CompositionController(latent_size=(toymodel.LATENT_SIZE,) * 2, store=store))
    log = open(workdir / "loss.log", "a")
    t_end = None if max_minutes is None else time.time() + 60 * max_minutes
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="shapes-world", disable=not progress)

    def checkpoint(step):
        _save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                      "optimizer": opt.state_dict(), "ema_unet": ema_unet.shadow, "ema_text": ema_text.shadow,
                      "step": step}, ckpt_path)

    step = start
    for step in bar:
        images, scenes = render_scenes(cfg.seed, step, cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        kept = [bool(torch.rand((), generator=gen) >= cfg.caption_dropout) for _ in scenes]
        captions = [s.caption() if k else "" for s, k in zip(scenes, kept)]
        grounding = store is not None and step >= cfg.grounding_start
        if store is not None:
            store.clear()
            store.layers = layers if grounding else set()
        latents = encode_latents(vae, images)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        loss = denoising_loss(unet, noise_scheduler, latents, text_encoder(ids)[0], gen)
        line, postfix = f"{step} {loss.item():.5f}", {"loss": f"{loss.item():.4f}"}
        if grounding:
            targets = [object_token_positions(tokenizer, s) if k else [] for s, k in zip(scenes, kept)]
            grounding_loss = token_grounding_loss({layer: m for (layer, _), m in store.maps.items()}, targets,
                                                  (toymodel.LATENT_SIZE,) * 2)
            loss = loss + cfg.grounding_weight * grounding_loss
            line += f" {grounding_loss.item():.5f}"
            postfix["grounding"] = f"{grounding_loss.item():.3f}"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        log.write(line + "\n")
        bar.set_postfix(postfix)
        if (step + 1) % cfg.checkpoint_every == 0:
            checkpoint(step + 1)
            log.flush()
        if t_end is not None and time.time() > t_end:
            checkpoint(step + 1)
            break
    else:
        checkpoint(cfg.steps)
    log.close()
    pipe = checkpoint_pipeline(workdir, tokenizer_dir, vae)
    if export_dir is not None:
        export(workdir, pipe, export_dir)
    return pipe


def exported_model_record(model_dir: Path, parts: tuple[str, ...]) -> dict:
    """The `training.json` of a model written by `studio toyworld export`, checked before a run starts from it (so
    a wrong folder leaves no half-made run behind)."""
    from studio.errors import ModelNotAvailable

    missing = [name for name in ("training.json", *(f"{part}/config.json" for part in parts))
               if not (model_dir / name).exists()]
    if missing:
        raise ModelNotAvailable(f"{model_dir} is not a model exported by `studio toyworld export` (it has no "
                                f"{', '.join(missing)}).")
    return json.loads((model_dir / "training.json").read_text())


def load_exported_weights(model_dir: Path, unet, text_encoder) -> None:
    """Copy an exported pipeline's UNet and text-encoder weights (fp16 on disk) into fp32 modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet").state_dict())
    text_encoder.load_state_dict(CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder").state_dict())
    unet.float(), text_encoder.float()


CHECKPOINT_WEIGHTS = ("ema", "raw")


def export(workdir: Path, pipe, out_dir: Path, weights: str = "ema") -> None:
    """A pipeline of the run (`weights`: which of the checkpoint's weights it holds) as a diffusers folder, with
    `training.json` saying how it was made (so that `--init-from` can continue from it on another machine)."""
    toymodel.export_pipeline(pipe, out_dir)
    ckpt_step = checkpoint_step(workdir)
    record = {"steps": ckpt_step, "weights": weights, "config": json.loads((workdir / "config.json").read_text()),
              "command": "studio toyworld train", "vae": json.loads((workdir / "vae_report.json").read_text())
              if (workdir / "vae_report.json").exists() else None}
    for lineage in ("continued_from", "warm_started_from"):
        if (workdir / f"{lineage}.json").exists():
            record[lineage] = json.loads((workdir / f"{lineage}.json").read_text())
    (Path(out_dir) / "training.json").write_text(json.dumps(record, indent=1))


def checkpoint_pipeline(workdir: Path, tokenizer_dir: Path, vae=None, weights: str = "ema"):
    """The pipeline with the EMA weights of the last checkpoint, or (`weights="raw"`) the optimiser's own: the EMA
    (decay 0.999) still holds about the last 1,000 steps, too slow to show a change of recipe made since."""
    if weights not in CHECKPOINT_WEIGHTS:
        raise StudioError(f"The weights must be one of {', '.join(CHECKPOINT_WEIGHTS)}, not {weights!r}.")
    if not (Path(workdir) / "checkpoint.pt").is_file():
        raise StudioError(f"{workdir} holds no training checkpoint (checkpoint.pt): give the --workdir of a "
                          "`studio toyworld train` run.")
    vae = vae if vae is not None else train_vae(workdir, BaseTrainConfig(), progress=False)
    ckpt = torch.load(workdir / "checkpoint.pt", weights_only=True)
    unet, text_encoder = toymodel.build_unet(), toymodel.build_text_encoder()
    unet.load_state_dict(ckpt["ema_unet" if weights == "ema" else "unet"])
    text_encoder.load_state_dict(ckpt["ema_text" if weights == "ema" else "text_encoder"])
    pipe = toymodel.assemble_pipeline(copy.deepcopy(vae), text_encoder.eval(), toymodel.build_tokenizer(tokenizer_dir),
                                      unet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
