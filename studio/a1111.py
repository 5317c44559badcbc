"""Interop with AUTOMATIC1111's stable-diffusion-webui: the `parameters` infotext, sampler names, model and LoRA
hashes, `<lora:…>` prompt tags, and Regional Prompter's BREAK/ADDCOL/ADDROW regions. Pure Python, no torch.

Mirrored versions (read from their sources, not from memory):

- stable-diffusion-webui **v1.10.1** (tag v1.10.1, commit 82a973c0, 2024-07-27, the latest release): infotext
  writing is `modules/processing.py: create_infotext`, quoting `modules/infotext_utils.py: quote`, sampler and
  schedule names `modules/sd_samplers.py`, `sd_samplers_kdiffusion.py`, `sd_schedulers.py`, hashes
  `modules/hashes.py`, prompt tags `modules/extra_networks.py` and `extensions-builtin/Lora/extra_networks_lora.py`,
  LoRA lookup `extensions-builtin/Lora/networks.py` and `network.py`.
- sd-webui-regional-prompter (hako-mikan), commit be623452 (2025-06-23): `scripts/rp.py` (keyconverter,
  bckeydealer, keyreplacer, commondealer) and `scripts/regions.py` (split_l2, makeimgtmp, matrixdealer).

What each function mirrors, and where it knowingly differs, is said in its docstring.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

from studio.errors import LoraError, PresetError

A1111_VERSION = "v1.10.1"


# --------------------------------------------------------------------------------------------------- infotext


def quote(value) -> str:
    """A1111's infotext quoting (`infotext_utils.quote`): a value whose text contains a comma, a newline or a colon
    is written as a JSON string (`json.dumps(value, ensure_ascii=False)`, so non-ASCII stays as is); any other value
    is written as its plain text. (A1111 returns the value itself and lets the f-string format it, which is the
    same text; a value json cannot encode is dumped as its text here, where A1111 would fail.)"""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The last three lines of A1111's `processing.create_infotext`: the fields in their order, `None` left out, a
    field whose value equals its key written as the bare key, every other as `key: quote(value)`, joined by ", ";
    the "Negative prompt: …" line only when the negative prompt is non-empty; the whole text `.strip()`ped."""
    params = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params}".strip()


def ui_number(value: float) -> int | float:
    """A number as A1111's web UI hands it to processing: gradio 3 sliders send JSON numbers, and JavaScript writes a
    whole number without a fraction, so CFG 7.0 arrives as the int 7 and 7.5 as the float 7.5. A1111 writes
    `str(p.cfg_scale)`, hence "CFG scale: 7" from the UI (the API, whose default is 7.0, writes "CFG scale: 7.0")."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A1111's own fields, in the order create_infotext lists them. Only the first ones are ours to fill; the others are
# kept (as None) so that an `extra` key naming one of them lands where A1111 would put it: a key already in a Python
# dict literal keeps its first position when `**p.extra_generation_params` sets it again.
_A1111_FIELDS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
                 "Size", "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE",
                 "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
                 "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr",
                 "Init image hash", "RNG", "Tiling")


@dataclass
class GenerationParameters:
    """One txt2img image's parameters, written as A1111 v1.10.1's `create_infotext` writes them.

    `sampler` is a name of `A1111_SAMPLERS` (split into A1111's Sampler and Schedule type by `infotext_sampler`),
    or any A1111 sampler name when `schedule_type` is given too (then both are written as given).
    `lora_hashes` maps the name written in the prompt tag to its short hash (`lora_short_hash`). `extra` holds
    other fields (hires, script fields…), written in their order where A1111 writes `extra_generation_params`:
    after A1111's own fields, before "Lora hashes" (the LoRA extension adds it when the networks activate, after
    the scripts' `process()` added theirs) and "Version". `version` is written only when given (A1111 writes its
    git tag; we are not A1111). Empty `model`/`model_hash` are left out."""

    prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    negative_prompt: str = ""
    schedule_type: str | None = None
    model_hash: str | None = None
    model: str | None = None
    lora_hashes: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)
    version: str | None = None

    def fields(self) -> dict[str, object]:
        """The fields in create_infotext's order (None: not written)."""
        if self.schedule_type is None:
            sampler, schedule = infotext_sampler(self.sampler)
        else:
            sampler, schedule = self.sampler, self.schedule_type
        fields: dict[str, object] = dict.fromkeys(_A1111_FIELDS)
        fields.update({"Steps": self.steps, "Sampler": sampler, "Schedule type": schedule,
                       "CFG scale": ui_number(self.cfg_scale), "Seed": self.seed, "Size": f"{self.width}x{self.height}",
                       "Model hash": self.model_hash or None, "Model": self.model or None})
        fields.update(self.extra)
        if self.lora_hashes:
            fields["Lora hashes"] = lora_hashes_text(self.lora_hashes)
        fields["Version"] = self.version
        fields["User"] = None
        return fields

    def infotext(self) -> str:
        return infotext(self.prompt, self.negative_prompt, self.fields())


def lora_hashes_text(hashes: Mapping[str, str]) -> str:
    """The "Lora hashes" value as `extra_networks_lora.ExtraNetworkLora.activate` builds it: `name: hash` pairs joined
    by ", ", each name with its ':' and ',' removed (`remove_symbols`). `quote` then JSON-quotes the whole value."""
    strip = str.maketrans("", "", ":,")
    return ", ".join(f"{name.translate(strip)}: {short}" for name, short in hashes.items())


# --------------------------------------------------------------------------------------------------- samplers

# A1111 sampler name (the combined pre-1.9 form, which diffusers' documentation maps) -> (diffusers scheduler class,
# kwargs for `from_config`). From diffusers' "Schedulers" overview table: DPM++ 2M and its Karras variant
# (use_karras_sigmas=True), Euler, Euler a. DPM++ SDE Karras: the table names DPMSolverSinglestepScheduler, but
# DPMSolverSDEScheduler is diffusers' port of the very k-diffusion function A1111 runs (sample_dpmpp_sde, Brownian
# tree noise; it needs `torchsde`). The table has no A1111 row for DDIM, UniPC and LCM: DDIM is DDIMScheduler with
# A1111's timesteps (range(0, 1000, 1000 // steps) + 1, i.e. "leading" spacing, offset 1); UniPC uses A1111's default
# settings (uni_pc_variant bh1, uni_pc_order 3); LCM is LCMScheduler.
A1111_SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3}),
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    "LCM": ("LCMScheduler", {}),
}

# What A1111 >= 1.9 writes for each: its Sampler and the "Schedule type" label. With "Automatic", A1111 runs the
# sampler's own default schedule and writes that schedule's label when it has one (sd_samplers_kdiffusion:
# KDiffusionSampler.get_sigmas), so DPM++ 2M on Automatic runs and writes Karras; the plain (non-Karras) DPM++ 2M of
# A1111 < 1.9 is therefore "Uniform" (model_wrap.get_sigmas, what "DPM++ 2M" ran before 1.9). Samplers without a
# default schedule (Euler, Euler a, LCM) and the timestep samplers (DDIM, UniPC) write "Automatic".
_INFOTEXT_SAMPLERS: dict[str, tuple[str, str]] = {
    "Euler": ("Euler", "Automatic"),
    "Euler a": ("Euler a", "Automatic"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ SDE Karras": ("DPM++ SDE", "Karras"),
    "UniPC": ("UniPC", "Automatic"),
    "DDIM": ("DDIM", "Automatic"),
    "LCM": ("LCM", "Automatic"),
}

# sd_schedulers.schedulers: (name, label, aliases), in A1111's order (suffix matching follows it).
_A1111_SCHEDULES = (("automatic", "Automatic", ()), ("uniform", "Uniform", ()), ("karras", "Karras", ()),
                    ("exponential", "Exponential", ()), ("polyexponential", "Polyexponential", ()),
                    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)), ("kl_optimal", "KL Optimal", ()),
                    ("align_your_steps", "Align Your Steps", ()), ("simple", "Simple", ()), ("normal", "Normal", ()),
                    ("ddim", "DDIM", ()), ("beta", "Beta", ()))
# The default schedule of A1111's samplers that have one (samplers_k_diffusion options 'scheduler').
_DEFAULT_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                     "DPM++ 2M SDE Heun": "Exponential", "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential",
                     "DPM2": "Karras", "DPM2 a": "Karras", "Restart": "Karras"}
_TIMESTEP_SAMPLERS = {"DDIM", "UniPC"}  # sd_samplers_timesteps: they ignore the schedule type


def infotext_sampler(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them for a name of `A1111_SAMPLERS`; e.g. "DPM++ 2M Karras"
    -> ("DPM++ 2M", "Karras"), "Euler a" -> ("Euler a", "Automatic"), plain "DPM++ 2M" -> ("DPM++ 2M", "Uniform")."""
    try:
        return _INFOTEXT_SAMPLERS[name]
    except KeyError:
        raise PresetError(f"{name!r} is not a sampler the studio maps to A1111 (one of "
                          f"{', '.join(A1111_SAMPLERS)}).") from None


def split_sampler_name(sampler: str, schedule_type: str | None = None) -> tuple[str, str]:
    """A1111's `sd_samplers.get_sampler_and_scheduler(..., convert_automatic=False)` on a name: a trailing schedule
    label, name or alias (" Karras", " karras", …) is split off the sampler name and wins over `schedule_type`;
    no schedule at all is "Automatic". (Unknown sampler names are kept, where A1111 would fall back to its first.)"""
    label_of = {key: label for key, label, _ in _A1111_SCHEDULES} | {label: label for _, label, _ in _A1111_SCHEDULES}
    found = label_of.get(schedule_type or "", "Automatic")  # schedulers_map.get(name, schedulers[0])
    for key, label, aliases in _A1111_SCHEDULES:  # every schedule, on the name as shortened so far
        for option in (label, key, *aliases):
            if sampler.endswith(" " + option):
                found, sampler = label, sampler[:-(len(option) + 1)]
                break
    return sampler, found


def sampler_from_infotext(sampler: str, schedule_type: str | None = None) -> str | None:
    """The `A1111_SAMPLERS` name that reproduces an infotext's Sampler (+ Schedule type), or None when the studio has
    no equivalent (e.g. "DPM++ 2M" on "Exponential"). "Automatic" resolves to the sampler's default schedule as A1111
    runs it; DDIM and UniPC ignore the schedule as A1111 does. An infotext without a Schedule type field predates
    A1111 1.9, where a plain name meant the model's own (uniform) schedule: "Sampler: DPM++ 2M" alone is the
    non-Karras DPM++ 2M. (A1111 1.10 itself reads such a field as Automatic, i.e. Karras.)"""
    pre_19 = schedule_type is None
    name, schedule = split_sampler_name(sampler, schedule_type)
    if name in _TIMESTEP_SAMPLERS:
        return name
    if schedule == "Automatic":
        schedule = "Uniform" if pre_19 else _DEFAULT_SCHEDULE.get(name, "Uniform")
    for ours, (a_sampler, a_schedule) in _INFOTEXT_SAMPLERS.items():
        if a_sampler == name and (a_schedule == "Automatic" and schedule == "Uniform" or a_schedule == schedule):
            return ours
    return None


# --------------------------------------------------------------------------------------------------- hashes


def autov2_hash(path: str | os.PathLike) -> str:
    """A1111's model hash ("AutoV2", `sd_models.CheckpointInfo.calculate_shorthash`): the first 10 hex digits of the
    sha256 of the whole file (computed once per file version by studio.lora.hashes, like A1111's cache)."""
    from studio.lora.hashes import file_hashes

    return file_hashes(Path(path), None).model_hash


def addnet_hash(path: str | os.PathLike) -> str:
    """A1111's `hashes.addnet_hash_safetensors` (kohya's hash, full 64 hex digits): the sha256 of the bytes after
    the safetensors header, i.e. from offset 8 + the little-endian u64 header length. Editing the metadata
    therefore does not change it. A1111's "Lora hashes" use its first 12 digits."""
    from studio.lora.hashes import file_hashes

    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    return file_hashes(Path(path), 8 + length).tensor_sha256


def lora_short_hash(path: str | os.PathLike) -> str:
    """The 12-digit hash A1111 writes in "Lora hashes" (`network.NetworkOnDisk`): for a .safetensors file the
    `sshs_model_hash` metadata when the trainer stored one, else `addnet_hash`; for .pt/.ckpt the sha256 of the
    whole file."""
    from studio.lora.hashes import file_hashes

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        full = _safetensors_metadata(path).get("sshs_model_hash") or addnet_hash(path)
    else:
        full = file_hashes(path, None).sha256
    return full[:12]


def _safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` map of a safetensors header, {} when there is none or the header cannot be read (A1111
    reports and goes on the same way). studio.lora.header is the validating reader; this one only needs the map
    and stays free of the torch import that package brings."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 * 1024 * 1024:
                return {}
            metadata = json.loads(f.read(length)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


# --------------------------------------------------------------------------------------------------- lora tags

# extra_networks.re_extra_net: any `<network:args>` tag. parse_prompt removes every one of them from the prompt
# (an unknown network is only logged and skipped) and hands each network its colon-separated arguments.
RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_NETWORKS = {"lora", "lyco"}  # lora_script.py registers "lyco" as an alias of the Lora network


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:…>` tag: the name as written, its text-encoder and UNet multipliers."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its extra-network tags, and its LoRA tags in prompt order.

    Mirrors `extra_networks.parse_prompt` (every `<word:args>` tag replaced by "", nothing else touched, so the
    text around a tag keeps its spaces and commas), `ExtraNetworkParams` (arguments split on ':'; one that splits
    on '=' into exactly two parts is named, the others positional) and `ExtraNetworkLora.activate`: name =
    first positional; te = second positional or 1.0, then named `te=`; unet = third positional or te (after `te=`),
    then named `unet=`. So `<lora:x>`, `<lora:x:0.8>`, `<lora:x:0.5:1>`, `<lora:x:te=0.5:unet=0.8>` and
    `<lora:x:unet=0.3>` (te 1.0) all work; `<lyco:…>` is the same network. Tags come in prompt order (A1111 takes
    all tags of whichever of lora/lyco comes first, then the other's: only the order of "Lora hashes" differs).

    Tags of other networks (`<hypernet:…>`) are removed and ignored, as A1111 does with networks it lacks. Two tags
    naming one file are both returned, as A1111 keeps both (see `effective_lora_weights` for what that applies).
    Where A1111 would fail or silently differ, this refuses with a PresetError naming the tag: a weight float()
    cannot read or that is not finite, a tag without a name, `dyn`/a fourth positional (DyLoRA rank, not
    supported), and a named argument other than te/unet (another extension's, e.g. lbw=, which would change the
    result here unseen)."""
    tags: list[LoraTag] = []

    def found(match: re.Match) -> str:
        if match.group(1) in _LORA_NETWORKS:
            tags.append(_lora_tag_from(match.group(0), match.group(2).split(":")))
        return ""

    return RE_EXTRA_NETWORK.sub(found, prompt), tags


def _lora_tag_from(text: str, items: list[str]) -> LoraTag:
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if len(positional) > 3 or "dyn" in named:
        raise PresetError(f"The LoRA tag {text} sets a DyLoRA rank (dyn), which the studio does not support.")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise PresetError(f"The LoRA tag {text} has the argument {unknown[0]}=, which the studio does not support "
                          "(only te= and unet=).")
    if not positional or not positional[0]:
        raise PresetError(f"The LoRA tag {text} names no LoRA.")

    def weight(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise PresetError(f"The LoRA tag {text} has the weight {value!r}, which is not a number.")
        return number

    te = weight(positional[1]) if len(positional) > 1 else 1.0
    te = weight(named["te"]) if "te" in named else te
    unet = weight(positional[2]) if len(positional) > 2 else te
    unet = weight(named["unet"]) if "unet" in named else unet
    return LoraTag(positional[0], te, unet)


def effective_lora_weights(tags: Iterable[LoraTag]) -> dict[str, tuple[float, float]]:
    """The (te, unet) multiplier A1111 v1.10.1 applies per LoRA name, tags naming one file included.

    `networks.load_networks` keeps one entry per tag, but every entry of one name is the same in-memory network
    object (`networks_in_memory`), whose multipliers each tag overwrites; `network_apply_weights` then adds that
    object's delta once per entry. So n tags of one name apply n × the *last* tag's weights:
    `<lora:x:0.5> <lora:x:0.8>` is x at 1.6 (not 1.3), `<lora:x:1> <lora:x:0>` is x at 0."""
    count: dict[str, int] = defaultdict(int)
    last: dict[str, LoraTag] = {}
    for tag in tags:
        count[tag.name] += 1
        last[tag.name] = tag
    return {name: (count[name] * tag.te_weight, count[name] * tag.unet_weight) for name, tag in last.items()}


def _tag_number(value: float) -> str:
    """A weight as A1111's UI writes it in a tag (a JavaScript number: 1, 0.8, never 1.0)."""
    value = float(value)
    if not math.isfinite(value):
        raise PresetError(f"A LoRA weight must be a finite number, not {value}.")
    return str(int(value)) if value.is_integer() else repr(value)


def lora_tag(name: str, weight: float = 1.0, unet_weight: float | None = None) -> str:
    """`<lora:name:weight>` (A1111's UI form), or `<lora:name:te:unet>` when the UNet weight differs; a name that the
    tag syntax cannot carry (containing ':', '<', '>' or '=', or empty) is refused with a PresetError."""
    if not name or any(c in name for c in ":<>=") or name != name.strip():
        raise PresetError(f"The LoRA name {name!r} cannot be written in a <lora:…> tag.")
    text = f"<lora:{name}:{_tag_number(weight)}"
    if unet_weight is not None and float(unet_weight) != float(weight):
        text += f":{_tag_number(unet_weight)}"
    return text + ">"


# --------------------------------------------------------------------------------------------------- lora lookup

LORA_SUFFIXES = (".pt", ".ckpt", ".safetensors")  # networks.process_network_files: allowed_extensions


def _natural_key(text: str) -> list:
    """util.natural_sort_key."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split("([0-9]+)", text)]


def _lora_files(folders: Iterable[Path]) -> list[Path]:
    """LoRA files in A1111's walk order (`util.walk_files`): each folder recursively, links followed, directories
    in natural order of their path, files in natural order of their name, suffixes compared lower-cased (hidden
    directories included: list_hidden_files defaults to on)."""
    files = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, names in sorted(os.walk(folder, followlinks=True), key=lambda item: _natural_key(item[0])):
            files += [Path(root, n) for n in sorted(names, key=_natural_key) if Path(n).suffix.lower() in LORA_SUFFIXES]
    return files


def resolve_lora_name(name: str, folders: Iterable[str | os.PathLike]) -> Path:
    """The LoRA file a prompt tag names, found as A1111's `networks.load_networks` finds it, then more leniently:

    1. a file whose stem is `name` exactly (A1111's `available_networks`; when several files share the stem the
       last in A1111's walk order wins, as its dict keeps the last);
    2. a .safetensors file whose `ss_output_name` metadata is `name` exactly (A1111's alias; its UI writes tags
       with the alias by default), last one winning likewise;
    3. a file whose stem equals `name` ignoring case (our addition: A1111 is case-sensitive); several such files
       are ambiguous and refused.

    Raises LoraError naming the folders when nothing matches."""
    folders = [Path(f) for f in folders]
    files = _lora_files(folders)
    by_stem = {f.stem: f for f in files}
    if name in by_stem:
        return by_stem[name]
    aliases = {}
    for f in files:
        if f.suffix.lower() == ".safetensors":
            alias = _safetensors_metadata(f).get("ss_output_name")
            if isinstance(alias, str):
                aliases[alias] = f
    if name in aliases:
        return aliases[name]
    folded = {}
    for f in files:
        if f.stem.lower() == name.lower():
            folded.setdefault(f.stem, f)
    if len(folded) == 1:
        return next(iter(folded.values()))
    where = ", ".join(str(f) for f in folders) or "no folder"
    if folded:
        raise LoraError(f"The LoRA name {name!r} matches {', '.join(sorted(folded))} in {where} when case is "
                        "ignored; write it with its exact case.")
    raise LoraError(f"No LoRA named {name!r} in {where} (looked for .safetensors, .pt and .ckpt files by file "
                    "name and by ss_output_name).")


# --------------------------------------------------------------------------------------------------- regions

BREAK, ADDCOMM, ADDBASE, ADDCOL, ADDROW, ADDP = "BREAK", "ADDCOMM", "ADDBASE", "ADDCOL", "ADDROW", "ADDP"
_REGION_KEYS = (ADDCOMM, ADDROW, ADDCOL, ADDBASE, ADDP)  # regions.ALLKEYS, the keys keyreplacer turns into BREAK
DEFAULT_BASE_RATIO = "0.2"  # Regional Prompter's "Base Ratio" default


class Region(NamedTuple):
    """One region: the prompt Regional Prompter encodes for it (the common prompt already prepended) and its box
    (x0, y0, x1, y1) as fractions of the image width and height, origin top left."""

    prompt: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class RegionalPrompt:
    """A prompt split into regions as Regional Prompter's Matrix mode splits it.

    `common`: the ADDCOMM part (already prepended to `base` and every region's prompt, as commondealer does), or
    None. `base`: the ADDBASE prompt (common prepended), or None; `base_weights[i]` is how much of the base output
    region i receives (Base Ratio), 0.0 everywhere without a base. `regions`: in prompt order, i.e. the order of
    the prompt's parts: rows top to bottom then columns left to right in columns mode, columns left to right then
    rows top to bottom in rows mode."""

    common: str | None
    base: str | None
    regions: list[Region]
    base_weights: tuple[float, ...]


def split_regions(prompt: str, mode: str = "columns", ratios: str | None = None, *, base_ratios: str | None = None,
                  use_common: bool = False, use_base: bool = False, and_is_break: bool = True) -> RegionalPrompt:
    """Regional Prompter's Matrix mode ("Main splitting" Columns or Rows) on a prompt, as its `process` does it:

    - "AND" becomes BREAK first (the default; its "disable convert 'AND' to 'BREAK'" option is and_is_break=False).
      Like the extension this is a plain substring replacement, as is BREAK's own splitting: keywords are
      upper-case and also match inside longer upper-case words.
    - keyconverter: the BREAKs, left to right, become the keys of the divide ratio's template (makeimgtmp):
      ADDCOMM first when use_common ("Use common prompt"), then ADDBASE when use_base ("Use base prompt"), each
      skipped when the prompt already has it, then the grid's separators. In columns mode `;` in the ratios
      separates rows (ADDROW) and `,` columns within a row (ADDCOL); in rows mode `,` separates columns and `;`
      rows within a column. A one-dimensional ratio ("1,2,1") splits along the mode's inner direction, so a plain
      BREAK is ADDCOL in columns mode and ADDROW in rows mode. ADDCOMM/ADDBASE in the prompt turn those on
      (bckeydealer).
    - matrixdealer: the grid comes from the prompt's ADDROW/ADDCOL structure; the ratios fill it by split_l2's
      broadcast rules (with `;`, each group's first number is the row's (column's) own size and the rest the cells';
      a short group repeats its last number, a long one overflows into the next, missing groups repeat the last);
      each group is normalised to its sum. `ratios=None` means equal parts, every BREAK (after the common and base
      prompts) being the mode's inner separator.
    - `base_ratios` ("Base Ratio", default "0.2") is broadcast over the same grid without a leading group size.
    - commondealer: the common part is prepended to the base and to each region with ", ".

    Whitespace around each part is stripped (the extension keeps it; the tokenizer does not see it). Refused with a
    PresetError: a prompt whose parts and regions do not pair up one to one (the extension would crash, or silently
    drop the text after a BREAK left inside a region), ADDP (the extension's Prompt mode), ADDBASE before ADDCOMM, a
    repeated ADDCOMM/ADDBASE, and ratios that are negative or sum to zero. Not supported: Random, Mask and Prompt
    modes, the Flip options, per-region negative prompts (split by BREAK on the negative side), Latent mode's AND
    handling, comment lines, and the "_" the extension puts in an empty last region.

    A prompt without any keyword is one region covering the image."""
    mode = mode.lower()
    if mode not in ("columns", "rows"):
        raise PresetError(f"The regional mode {mode!r} is not one of columns and rows.")
    rows_mode = mode == "rows"
    text = prompt.replace("AND", BREAK) if and_is_break else prompt
    if ADDP in text.upper():
        raise PresetError("The prompt uses ADDP, Regional Prompter's Prompt mode, which the studio does not support.")
    if not any(key in text for key in (*_REGION_KEYS, BREAK)):
        return RegionalPrompt(None, None, [Region(prompt.strip(), (0.0, 0.0, 1.0, 1.0))], (0.0,))
    for key in (ADDCOMM, ADDBASE):
        if text.count(key) > 1:
            raise PresetError(f"The prompt has {key} {text.count(key)} times; it may appear once.")
    if ratios is None:
        ratios = _equal_ratios(text, use_common, use_base)

    # keyconverter, then bckeydealer (both on the prompt, left to right)
    for key in _template_keys(ratios, rows_mode, use_common, use_base):
        if key in (ADDCOMM, ADDBASE) and key in text:
            continue
        text = text.replace(BREAK, key, 1)
    use_common = use_common or ADDCOMM in text
    use_base = use_base or ADDBASE in text
    for flag, key in ((use_common, ADDCOMM), (use_base, ADDBASE)):
        if flag and key not in text:
            if BREAK not in text:
                raise PresetError(f"The prompt has no BREAK to end its {'common' if key == ADDCOMM else 'base'} "
                                  "prompt.")
            text = text.replace(BREAK, key, 1)
    if ADDCOMM in text and ADDBASE in text and text.index(ADDBASE) < text.index(ADDCOMM):
        raise PresetError("The prompt has ADDBASE before ADDCOMM; the common prompt comes first.")

    # matrixdealer: the grid, its cell and group ratios, the base weights
    grid_text = text
    for key in (ADDCOMM, ADDBASE):
        if key in grid_text:
            grid_text = grid_text.split(key, 1)[1]
    outer_sizes, cell_sizes, breaks = _grid(grid_text, ratios, rows_mode)
    if base_ratios is None:
        base_ratios = DEFAULT_BASE_RATIO
    weights = _split_grid(base_ratios, structure=breaks, default=0.0, flip=rows_mode)

    # keyreplacer + commondealer: the parts the extension encodes, then its walk over them (i += 1 + breaks)
    parts = text
    for key in _REGION_KEYS:
        parts = parts.replace(key, BREAK)
    chunks = [c.strip() for c in parts.split(BREAK)]
    common = None
    if use_common:
        common, chunks = chunks[0], [_join(chunks[0], c) for c in chunks[1:]]
    index = 0
    base = None
    if use_base:
        base, index = chunks[0], 1
    cells = [(o, c, w) for o, group, group_w in zip(_ranges(outer_sizes), cell_sizes, weights)
             for c, w in zip(_ranges(group), group_w)]
    n_cells, leftover_breaks = len(cells), sum(map(sum, breaks))
    if leftover_breaks or len(chunks) - index != n_cells:
        raise PresetError(f"The prompt has {len(chunks) - index} region prompts but the divide ratio {ratios!r} "
                          f"describes {n_cells} regions.")
    regions, base_weights = [], []
    for (outer, cell, weight), chunk in zip(cells, chunks[index:]):
        x, y = (outer, cell) if rows_mode else (cell, outer)
        regions.append(Region(chunk, (x[0], y[0], x[1], y[1])))
        base_weights.append(float(weight) if use_base else 0.0)
    return RegionalPrompt(common, base, regions, tuple(base_weights))


def _join(common: str, part: str) -> str:
    return f"{common}, {part}" if common and part else common or part


def _equal_ratios(text: str, use_common: bool, use_base: bool) -> str:
    """Equal parts: a one-dimensional ratio of ones, one per BREAK left after the common and base prompts, plus
    one; keyconverter then turns every such BREAK into the mode's inner separator, and split_l2 repeats the ones
    over any ADDROW/ADDCOL grid the prompt has."""
    separators = text.count(BREAK) - sum(1 for flag, key in ((use_common, ADDCOMM), (use_base, ADDBASE))
                                         if flag and key not in text)
    return ",".join(["1"] * (max(separators, 0) + 1))


def _number(value: str, default: float) -> float:
    """regions.floatdef: float(value), or the default for what is not a number (an empty ratio)."""
    try:
        return float(value)
    except ValueError:
        return default


def _template_keys(ratios: str, rows_mode: bool, use_common: bool, use_base: bool) -> list[str]:
    """The keys makeimgtmp's prompt template lists, in order (ADDCOMM, ADDBASE, then the grid's separators)."""
    inner, outer = (ADDROW, ADDCOL) if rows_mode else (ADDCOL, ADDROW)
    if ";" not in ratios:
        groups = [ratios.split(",")]
    else:
        outer_delim, inner_delim = (",", ";") if rows_mode else (";", ",")
        groups = [g.split(inner_delim) for g in ratios.split(outer_delim)]
        groups = [g[1:] if len(g) > 1 else g for g in groups]  # each group's first number is its own size
    keys = [ADDCOMM] * use_common + [ADDBASE] * use_base
    for i, group in enumerate(groups):
        keys += [outer] * (i > 0) + [inner] * (len(group) - 1)
    return keys


def _grid(text: str, ratios: str, rows_mode: bool) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """matrixdealer: (group sizes, cell sizes per group, BREAKs left in each cell)."""
    has_row, has_col = ADDROW in text, ADDCOL in text
    if has_row or has_col:
        outer_key, inner_key = (ADDCOL, ADDROW) if rows_mode else (ADDROW, ADDCOL)
        breaks = [[cell.count(BREAK) for cell in group.split(inner_key)] for group in text.split(outer_key)]
        if ";" not in ratios and has_row != has_col:
            # one kind of key with a one-dimensional ratio: the ratio numbers the cells when only the inner key is
            # used (one group, of size 1), the groups when only the outer one is
            if has_row == rows_mode:
                sizes, cells = _split_grid("1," + ratios, breaks, 1.0, flip=False, group_sizes=True)
            else:
                sizes, cells = _split_grid(ratios, breaks, 1.0, flip=True, group_sizes=True)
        else:
            sizes, cells = _split_grid(ratios, breaks, 1.0, flip=rows_mode, group_sizes=True)
    else:
        sizes, cells = _split_grid(ratios, None, 1.0, flip=rows_mode, group_sizes=True)
        breaks = [[0] * len(group) for group in cells]
    return sizes, cells, breaks


def _split_grid(text: str, structure: list[list] | None, default: float, flip: bool, group_sizes: bool = False):
    """regions.split_l2 on a ratio string: groups split on ';' and cells on ',' (swapped when flip), each number
    read by floatdef. With group_sizes, each group's first number is taken out as the group's own size (a group of
    one number keeps it as its cell too) and (sizes, cells) is returned. With a structure (a list of groups of
    cells), the numbers are fitted to it: a group with fewer cells than the structure's repeats its last number, one
    with more overflows into the next group (whose size is then taken from the overflow when group_sizes), numbers
    past the end are dropped, and missing groups repeat the last number read (and the last size)."""
    outer_delim, inner_delim = (",", ";") if flip else (";", ",")
    groups = [[_number(v, default) for v in g.split(inner_delim)] for g in text.split(outer_delim)]
    if structure is None:
        if not group_sizes:
            return groups
        return [g[0] for g in groups], [g[1:] if len(g) > 1 else g for g in groups]
    sizes, cells, last = [], [], 1.0
    r = 0
    for values in groups:
        last = values[-1]
        while r < len(structure) and values:
            if group_sizes:
                sizes.append(values[0])
                if len(values) > 1:
                    values = values[1:]
            want = len(structure[r])
            if want >= len(values):
                cells.append(values + [values[-1]] * (want - len(values)))
                r += 1
                break
            cells.append(values[:want])
            values = values[want:]
            r += 1
    cells += [[last] * len(structure[i]) for i in range(len(cells), len(structure))]
    if not group_sizes:
        return cells
    sizes += [sizes[-1]] * (len(structure) - len(sizes))
    return sizes, cells


def _ranges(sizes: list[float]) -> list[tuple[float, float]]:
    """regions.list_percentify + list_cumsum + list_rangify: each size as a fraction of their sum, laid end to end
    from 0."""
    total = sum(sizes)
    if any(s < 0 for s in sizes) or total <= 0:
        raise PresetError(f"The divide ratios {', '.join(f'{s:g}' for s in sizes)} must be non-negative with a "
                          "positive sum.")
    out, start, acc = [], 0.0, 0.0
    for s in sizes:
        acc += s / total
        out.append((start, acc))
        start = acc
    return out
