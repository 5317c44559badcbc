"""Single-file Stable Diffusion checkpoints (the original LDM layout A1111, Forge and ComfyUI use) loaded
fully offline, and the checkpoints and LoRA folders of an A1111 or ComfyUI install.

What a file is comes from its safetensors header alone (tensor names, shapes and metadata; no tensor is
read and nothing is unpickled):

* family, from the text encoder's key prefix: SD1.x `cond_stage_model.transformer.`, SD2.x
  `cond_stage_model.model.` (OpenCLIP), SDXL `conditioner.embedders.1.` (its second, OpenCLIP bigG encoder);
* configuration: the public diffusers configuration of the family, shipped in `assets/configs/<name>`
  (sd15, sd2 = SD2.x 768-v, sd2-base = SD2.x 512 epsilon, sdxl), with every size the weights state
  overriding it: block widths, layers per block, which levels attend, transformer depth, cross-attention
  width, linear or convolutional projections, SDXL's size-conditioning width; VAE widths, depth, latent
  channels, mid attention; text encoder width, depth, feed-forward width, vocabulary, positions,
  projection. A checkpoint of the published shape gets the published configuration unchanged; a pruned or
  resized one gets the configuration its tensors describe. Attention head counts are not written in any
  weight: at the published widths the published counts are kept, otherwise heads are 64 wide (SD2, SDXL
  and the text encoders, as in the published models) or eight per layer (SD1's UNet, as published);
* prediction type, see `is_v_prediction`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from studio import paths
from studio.errors import ModelNotAvailable, StudioError
from studio.lora.header import SafetensorsHeader, read_header
from studio.models import FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
REFINER_TEXT = "conditioner.embedders.0.model."

CONFIG_SD15, CONFIG_SD2, CONFIG_SD2_BASE, CONFIG_SDXL = "sd15", "sd2", "sd2-base", "sdxl"
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # shared by every shipped tokenizer, from assets/clip_tokenizer

A1111, COMFYUI, FOLDER = "A1111", "ComfyUI", "folder"
_LORA_MARKERS = ("lora_down", "lora_up", "lora.down", "lora.up", "lora_a.", "lora_b.", "hada_w", "lokr_w")
_SKIPPED_FOLDERS = {"__pycache__", "node_modules", "venv", ".venv", ".git"}


def configs_folder() -> Path:
    return paths.ASSETS / "configs"


def shipped_config(family: str, v_prediction: bool = False) -> Path:
    """The shipped configuration folder of a family: SD2.x has two, 768-v (v-prediction) and 512 base."""
    name = {FAMILY_SD1: CONFIG_SD15, FAMILY_SDXL: CONFIG_SDXL,
            FAMILY_SD2: CONFIG_SD2 if v_prediction else CONFIG_SD2_BASE}[family]
    return configs_folder() / name


# ---------------------------------------------------------------------------------------------------- header

def read_checkpoint_header(path: Path) -> SafetensorsHeader:
    """The header of a `.safetensors` checkpoint; pickles and unreadable files refused in one sentence."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelNotAvailable(f"{path.name} is not a .safetensors checkpoint; pickled checkpoints (.ckpt, .pt, .bin) "
                                "can run code when loaded and are refused.")
    try:
        return read_header(path)
    except StudioError as exc:
        reason = str(exc).removeprefix(f"{path.name} ").removeprefix("is not a safetensors file: ").rstrip(".")
        reason = "it " + reason if reason.startswith(("is ", "has ", "cannot ")) else reason
        raise ModelNotAvailable(f"{path.name} is not a readable safetensors file: {reason}.") from None


def _family_of(keys) -> tuple[str | None, str | None]:
    """(family, None) for a loadable SD1/SD2/SDXL key set, else (None, the reason as a sentence tail)."""
    keys = list(keys)
    if not any(k.startswith(UNET) for k in keys):
        return None, ("is not a Stable Diffusion checkpoint (no model.diffusion_model weights); is it a LoRA? "
                      "Load LoRAs from the LoRA library instead.")
    if f"{UNET}input_blocks.0.0.weight" not in keys:
        return None, ("is not an SD1.x, SD2.x or SDXL checkpoint (its diffusion model has no UNet input blocks: "
                      "Flux, SD3 and other transformer models are not supported).")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return FAMILY_SDXL, None
    if any(k.startswith(REFINER_TEXT) for k in keys):
        return None, ("is an SDXL refiner checkpoint, which only refines another model's images; give an SDXL base "
                      "checkpoint.")
    if any(k.startswith(SD2_TEXT) for k in keys):
        return FAMILY_SD2, None
    if any(k.startswith(SD1_TEXT) for k in keys):
        return FAMILY_SD1, None
    return None, ("holds no text encoder (no cond_stage_model or conditioner weights), so it is not a complete "
                  "checkpoint; give a full checkpoint or a diffusers folder.")


def checkpoint_family(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> str:
    """SD1.x, SD2.x or SDXL, from the header's tensor names only (see the module docstring); a
    ModelNotAvailable sentence for a file that is not one (a LoRA, a refiner, a transformer model)."""
    path = Path(path)
    header = header or read_checkpoint_header(path)
    family, reason = _family_of(header.tensors)
    if family is None:
        raise ModelNotAvailable(f"{path.name} {reason}")
    return family


# ---------------------------------------------------------------------------------------------- prediction

_YAML_V = re.compile(r"^\s*parameterization\s*:\s*['\"]?v['\"]?\s*(#.*)?$", re.MULTILINE)


def is_v_prediction(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> bool:
    """Whether the checkpoint says it predicts v (velocity) rather than the noise (epsilon).

    It says so by any of: a `v_pred` tensor (ComfyUI's marker, used by SDXL v-prediction models); the
    safetensors metadata `modelspec.prediction_type` starting with "v" (`v`, `v_prediction`) or
    `ss_v_parameterization` true (kohya's trainers); or, A1111's convention, a `.yaml` of the same name
    next to the file declaring `parameterization: "v"` (or an SDXL-style `VScaling` denoiser). Nothing
    else is guessed: without one of these the checkpoint is epsilon-prediction, which for SD2.x means
    the 512 base configuration (put SD2 768-v's `v2-inference-v.yaml` next to such a file, as A1111 asks).
    """
    path = Path(path)
    header = header or read_checkpoint_header(path)
    if "v_pred" in header.tensors:
        return True
    meta = {k.lower(): str(v).strip().lower() for k, v in header.metadata.items()}
    if meta.get("modelspec.prediction_type", "").startswith("v"):
        return True
    if meta.get("ss_v_parameterization") == "true":
        return True
    return _yaml_says_v(path.with_suffix(".yaml"))


def _yaml_says_v(yaml_path: Path) -> bool:
    try:
        text = yaml_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if "VScaling" in text:  # sgm (SDXL-style) configs name the denoiser's scaling class instead
        return True
    try:
        import yaml
    except ImportError:
        return bool(_YAML_V.search(text))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return bool(_YAML_V.search(text))
    return _find_parameterization(data) == "v"


def _find_parameterization(node) -> str | None:
    if isinstance(node, dict):
        value = node.get("parameterization")
        if isinstance(value, str):
            return value.strip().lower()
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_parameterization(child)
        if found is not None:
            return found
    return None


def _zero_terminal_snr(header: SafetensorsHeader) -> bool:
    """ComfyUI's `ztsnr` marker or kohya's `ss_zero_terminal_snr`: trained on a zero-terminal-SNR schedule."""
    return "ztsnr" in header.tensors or str(header.metadata.get("ss_zero_terminal_snr", "")).lower() == "true"


# ------------------------------------------------------------------------------------------- configuration

class _Incomplete(Exception):
    """A tensor the configuration is read from is absent; the message is a sentence tail."""


def _strip(shapes: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _need(shapes: dict, key: str, component: str) -> tuple[int, ...]:
    if key not in shapes:
        raise _Incomplete(f"it lacks the {component} weight {key}")
    return shapes[key]


def _indices(shapes: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def _heads(width: int, shipped_width: int, shipped_heads):
    """Published head count at the published width; 64-wide heads otherwise (one head below 64)."""
    if width == shipped_width:
        return shipped_heads
    return width // 64 if width % 64 == 0 else 1


def _unet_config(shipped: dict, shapes: dict, family: str, text_2_projection: int | None) -> dict:
    s = _strip(shapes, UNET)
    conv_in = _need(s, "input_blocks.0.0.weight", "UNet")
    inputs = _indices(s, r"input_blocks\.(\d+)\.")
    ops = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
    slots = ops[0] if ops else len(inputs)  # a level: its resnets, then (but the last) a downsampler
    n_levels = len(ops) + 1
    widths, down_attention, depth = [], [], []
    for level in range(n_levels):
        first = level * slots + 1
        widths.append(_need(s, f"input_blocks.{first}.0.out_layers.3.weight", "UNet")[0])
        blocks = _indices(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        down_attention.append(bool(blocks))
        depth.append(len(blocks) or 1)
    up_attention = [any(k.startswith(f"output_blocks.{level * slots}.1.transformer_blocks.") for k in s)
                    for level in range(n_levels)]
    config = dict(shipped)
    config.update(
        in_channels=conv_in[1], out_channels=_need(s, "out.2.weight", "UNet")[0], block_out_channels=widths,
        layers_per_block=slots - 1,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention])
    if len(set(depth)) == 1 and not isinstance(shipped.get("transformer_layers_per_block"), list):
        config["transformer_layers_per_block"] = depth[0]
    else:
        config["transformer_layers_per_block"] = depth
    to_k = next((v for k, v in sorted(s.items()) if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        config["cross_attention_dim"] = to_k[1]
    proj_in = next((v for k, v in sorted(s.items()) if k.endswith(".1.proj_in.weight")), None)
    if proj_in is not None:
        config["use_linear_projection"] = len(proj_in) == 2
    if widths != shipped["block_out_channels"]:
        if family == FAMILY_SD1:  # SD1 publishes eight heads per attention layer, whatever its width
            heads = shipped["attention_head_dim"]
            config["attention_head_dim"] = heads if all(w % heads == 0 for w in widths) else 1
        else:  # SD2 and SDXL publish 64-wide heads ("attention_head_dim" holds head counts in diffusers)
            config["attention_head_dim"] = [max(1, w // 64) for w in widths]
    if "label_emb.0.0.weight" in s:  # SDXL: pooled text projection + 6 Fourier-embedded sizes
        adm = s["label_emb.0.0.weight"][1]
        config["projection_class_embeddings_input_dim"] = adm
        if text_2_projection and (adm - text_2_projection) > 0 and (adm - text_2_projection) % 6 == 0:
            config["addition_time_embed_dim"] = (adm - text_2_projection) // 6
    return config


def _vae_config(shipped: dict, shapes: dict) -> dict:
    v = _strip(shapes, VAE)
    if not v:
        raise _Incomplete("it holds no VAE (no first_stage_model weights)")
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    config = dict(shipped)
    config.update(
        in_channels=_need(v, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_need(v, "decoder.conv_out.weight", "VAE")[0],
        block_out_channels=[_need(v, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in levels],
        layers_per_block=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=_need(v, "decoder.conv_in.weight", "VAE")[1],
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels))
    if not any(k.startswith("encoder.mid.attn_1.") for k in v):
        config["mid_block_add_attention"] = False
    if "quant_conv.weight" not in v:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" not in v:
        config["use_post_quant_conv"] = False
    return config


def _clip_config(shipped: dict, shapes: dict, prefix: str, component: str) -> dict:
    """OpenAI CLIP in the transformers layout (SD1, SDXL's first encoder)."""
    t = _strip(shapes, prefix)
    t = _strip(t, "text_model.") or t
    vocab, width = _need(t, "embeddings.token_embedding.weight", component)
    config = dict(shipped)
    config.update(
        vocab_size=vocab, hidden_size=width,
        max_position_embeddings=_need(t, "embeddings.position_embedding.weight", component)[0],
        num_hidden_layers=len(_indices(t, r"encoder\.layers\.(\d+)\.")),
        intermediate_size=_need(t, "encoder.layers.0.mlp.fc1.weight", component)[0],
        num_attention_heads=_heads(width, shipped["hidden_size"], shipped["num_attention_heads"]))
    return config


def _open_clip_config(shipped: dict, shapes: dict, prefix: str, component: str, penultimate: bool) -> dict:
    """OpenCLIP (SD2, SDXL's second encoder). SD2 conditions on the penultimate block, so diffusers' encoder
    has one block fewer than the file (23 of 24); a file whose unused final block was pruned away (23)
    keeps all of them."""
    t = _strip(shapes, prefix)
    vocab, width = _need(t, "token_embedding.weight", component)
    blocks = len(_indices(t, r"transformer\.resblocks\.(\d+)\."))
    layers = blocks - 1 if penultimate and blocks != shipped["num_hidden_layers"] else blocks
    if layers < 1:
        raise _Incomplete(f"its {component} has no usable transformer blocks")
    config = dict(shipped)
    config.update(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
        max_position_embeddings=_need(t, "positional_embedding", component)[0],
        intermediate_size=_need(t, "transformer.resblocks.0.mlp.c_fc.weight", component)[0],
        num_attention_heads=_heads(width, shipped["hidden_size"], shipped["num_attention_heads"]))
    if "text_projection" in t and not penultimate:
        config["projection_dim"] = t["text_projection"][1]
    return config


def derived_configs(folder: Path, header: SafetensorsHeader, family: str) -> dict[str, dict]:
    """The configuration of each model component: `folder`'s (a shipped one), with every size the
    checkpoint's tensor shapes state in place of the published one."""
    def shipped(name: str, file: str = "config.json") -> dict:
        return json.loads((folder / name / file).read_text())

    shapes = header.shapes()
    configs = {"vae": _vae_config(shipped("vae"), shapes)}
    text_2_projection = None
    if family == FAMILY_SD1:
        configs["text_encoder"] = _clip_config(shipped("text_encoder"), shapes, SD1_TEXT, "text encoder")
    elif family == FAMILY_SD2:
        configs["text_encoder"] = _open_clip_config(shipped("text_encoder"), shapes, SD2_TEXT, "text encoder",
                                                    penultimate=True)
    else:
        configs["text_encoder"] = _clip_config(shipped("text_encoder"), shapes, SDXL_TEXT, "first text encoder")
        configs["text_encoder_2"] = _open_clip_config(shipped("text_encoder_2"), shapes, SDXL_TEXT_2,
                                                      "second text encoder", penultimate=False)
        text_2_projection = configs["text_encoder_2"]["projection_dim"]
    configs["unet"] = _unet_config(shipped("unet"), shapes, family, text_2_projection)
    return configs


def _write_config_folder(target: Path, folder: Path, configs: dict[str, dict], scheduler: dict) -> None:
    """A complete diffusers configuration folder: `configs`, the scheduler, `folder`'s model index and
    tokenizer configs, and the shared BPE files linked (copied where links are not allowed)."""
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (target / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, config in {**configs, "scheduler": scheduler}.items():
        (target / name).mkdir()
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (target / name / file).write_text(json.dumps(config, indent=2))
    for tokenizer in sorted(folder.glob("tokenizer*")):
        (target / tokenizer.name).mkdir()
        shutil.copy(tokenizer / "tokenizer_config.json", target / tokenizer.name / "tokenizer_config.json")
        for file in TOKENIZER_FILES:
            source, link = paths.TOKENIZER / file, target / tokenizer.name / file
            try:
                link.symlink_to(source.resolve())
            except OSError:
                shutil.copy(source, link)


# --------------------------------------------------------------------------------------------------- loading

def load_single_file(path: str | os.PathLike, dtype=None, config: str | os.PathLike | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline (on the CPU) from a single-file checkpoint,
    without the network. `config` (a local diffusers folder of the same architecture) is used as given
    when passed; otherwise the shipped configuration of the checkpoint's family, sized from its tensors.
    The scheduler predicts v when `is_v_prediction` says so. ModelNotAvailable, one sentence, on failure."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path, config = Path(path), (Path(config).expanduser() if config else None)
    header = read_checkpoint_header(path)
    family = checkpoint_family(path, header)
    in_channels = header.tensors[f"{UNET}input_blocks.0.0.weight"].shape[1]
    if in_channels != 4:
        raise ModelNotAvailable(f"{path.name} is an inpainting or image-editing checkpoint (its UNet takes {in_channels} "
                                "input channels, text-to-image takes 4); give a text-to-image checkpoint.")
    v_prediction = is_v_prediction(path, header)
    zero_snr = _zero_terminal_snr(header)
    cls = StableDiffusionXLPipeline if family == FAMILY_SDXL else StableDiffusionPipeline
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        if config is not None:
            scheduler = _scheduler_override(config, v_prediction, zero_snr)
            pipe = _from_single_file(cls, path, config, kwargs if scheduler is None else
                                     {**kwargs, "scheduler": scheduler})
        else:
            folder = shipped_config(family, v_prediction)
            try:
                configs = derived_configs(folder, header, family)
            except _Incomplete as exc:
                raise ModelNotAvailable(f"{path.name} is an incomplete {family} checkpoint: {exc}; give a full "
                                        "checkpoint or a diffusers folder.") from None
            scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            if v_prediction:
                scheduler["prediction_type"] = "v_prediction"
            if zero_snr:
                scheduler = _zero_snr_scheduler(scheduler)
            with tempfile.TemporaryDirectory(prefix="studio-config-") as tmp:
                _write_config_folder(Path(tmp), folder, configs, scheduler)
                pipe = _from_single_file(cls, path, Path(tmp), kwargs)
    except ModelNotAvailable:
        raise
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise _unloadable(path, family, config, exc) from exc
        # a weight was absent, so its tensor stayed on the meta device and diffusers' dtype cast hit it
        where = f"the configuration in {config}" if config is not None else f"the {family} configuration"
        raise _incomplete(path, f"{where} needs") from exc
    except Exception as exc:
        raise _unloadable(path, family, config, exc) from exc
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [n for n, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
            if missing:
                raise _incomplete(path, f"of its {name} (e.g. {missing[0]})")
    log.info("loaded %s as %s (%s)", path.name, family, pipe.scheduler.config.prediction_type)
    return pipe


def _incomplete(path: Path, which: str) -> ModelNotAvailable:
    return ModelNotAvailable(f"{path.name} lacks weights {which}; the file is incomplete or of a layout the studio "
                             "does not know.")


def _unloadable(path: Path, family: str, config: Path | None, exc: Exception) -> ModelNotAvailable:
    where = f"with the configuration in {config}" if config is not None else f"with the shipped {family} configuration"
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return ModelNotAvailable(f"The checkpoint {path.name} could not be loaded {where} ({type(exc).__name__}: {first}); "
                             "pass --config with a local diffusers folder of the same architecture.")


def _zero_snr_scheduler(config: dict) -> dict:
    """A zero-terminal-SNR schedule (rescaled betas, trailing timesteps); DDIM where the configured class
    cannot rescale (SD1.5's PNDM)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        config = {**config, "_class_name": "DDIMScheduler"}
    return {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _from_single_file(cls, path: Path, folder: Path, kwargs: dict):
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)


def _scheduler_override(config: Path, v_prediction: bool, zero_snr: bool):
    """With a user's configuration folder: its scheduler, switched to v-prediction (and a zero-terminal-SNR
    schedule) only where the checkpoint says so; None to leave the folder's scheduler alone."""
    if not (v_prediction or zero_snr):
        return None
    import diffusers

    data = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    if v_prediction:
        data["prediction_type"] = "v_prediction"
    if zero_snr:
        data = _zero_snr_scheduler(data)
    return getattr(diffusers, data["_class_name"]).from_config(data)


# ---------------------------------------------------------------------------------------------------- finding

@dataclass
class ModelFolders:
    checkpoints: list[Path] = field(default_factory=list)  # loadable SD1/SD2/SDXL .safetensors checkpoints
    lora_folders: list[Path] = field(default_factory=list)
    kind: str = FOLDER  # "A1111" (also Forge, SD.Next), "ComfyUI", or "folder"


def classify_file(path: Path) -> str | None:
    """"checkpoint" (a loadable SD1.x/SD2.x/SDXL text-to-image checkpoint), "lora", or None, from the header."""
    from studio.errors import LoraError
    from studio.lora.keys import parse_keys

    try:
        header = read_header(path)
    except StudioError:
        return None
    family, _ = _family_of(header.tensors)
    if family is not None:
        return "checkpoint" if header.tensors[f"{UNET}input_blocks.0.0.weight"].shape[1:2] == (4,) else None
    try:
        parse_keys(path.name, list(header.tensors))
    except LoraError:  # a damaged or unsupported LoRA is still a LoRA: the library says what is wrong with it
        return "lora" if any(m in k.lower() for k in header.tensors for m in _LORA_MARKERS) else None
    return "lora"


def _install(root: Path) -> tuple[str, Path] | None:
    """(kind, models folder) of an A1111 or ComfyUI install at `root` (or its `models` folder, or the usual
    folder inside a portable download)."""
    for base in (root, root / "stable-diffusion-webui", root / "webui", root / "ComfyUI"):
        models = base / "models"
        if (models / "Stable-diffusion").is_dir():
            return A1111, models
        if (models / "checkpoints").is_dir():
            return COMFYUI, models
    if (root / "Stable-diffusion").is_dir():
        return A1111, root
    if (root / "checkpoints").is_dir() and (root / "loras").is_dir():
        return COMFYUI, root
    return None


def _safetensors_files(folder: Path) -> list[Path]:
    """Every `.safetensors` file below `folder` (linked folders followed once; hidden ones skipped)."""
    found, seen = [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_FOLDERS)
        found += [Path(current) / f for f in files if f.lower().endswith(".safetensors") and not f.startswith(".")]
    return sorted(found)


def find_models(root: str | os.PathLike) -> ModelFolders:
    """The checkpoints and LoRA folders under `root`: an A1111 install (models/Stable-diffusion;
    models/Lora, models/LyCORIS), a ComfyUI install (models/checkpoints; models/loras), or any folder,
    whose `.safetensors` files are told apart from their headers. Only loadable checkpoints are listed
    (pickles, refiners, inpainting and non-SD models are left out); headers are read, tensors never."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelNotAvailable(f"{root} is not a folder.")
    install = _install(root)
    if install is not None:
        kind, models = install
        checkpoint_dir, lora_dirs = (("Stable-diffusion", ("Lora", "LyCORIS")) if kind == A1111 else
                                     ("checkpoints", ("loras",)))
        checkpoints = [p for p in _safetensors_files(models / checkpoint_dir) if classify_file(p) == "checkpoint"]
        return ModelFolders(checkpoints, [models / d for d in lora_dirs if (models / d).is_dir()], kind)
    checkpoints, lora_folders = [], set()
    for file in _safetensors_files(root):
        kind = classify_file(file)
        if kind == "checkpoint":
            checkpoints.append(file)
        elif kind == "lora":
            lora_folders.add(file.parent)
    return ModelFolders(checkpoints, sorted(lora_folders), FOLDER)
