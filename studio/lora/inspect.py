"""What a LoRA file is, from its safetensors header alone: format, base model, rank, alpha, target
modules, trigger words and the hashes other tools show. Tensors are never loaded (the few scalar
`alpha` values are read with a seek each)."""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from studio.errors import LoraError
from studio.lora import keys as K
from studio.lora.hashes import FileHashes, file_hashes
from studio.lora.header import read_header, read_scalar
from studio.models import FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL, FAMILY_SHAPES

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Width of the text features the UNet's cross-attention reads (attn2.to_k in-features), and the
# hidden width of the first text encoder, per base model.
CROSS_ATTENTION_WIDTH = {768: FAMILY_SD1, 1024: FAMILY_SD2, 2048: FAMILY_SDXL, 128: FAMILY_SHAPES}
TEXT_ENCODER_WIDTH = {768: FAMILY_SD1, 1024: FAMILY_SD2, 128: FAMILY_SHAPES}
TOP_TAGS = 5


@dataclass
class LoraInfo:
    path: str
    name: str
    format: str
    base_model: str | None
    rank: int | None  # the most common rank; `ranks` lists them all
    ranks: list[int]
    alpha: float | None
    modules: int
    components: dict[str, int]  # modules per component
    has_text_encoder: bool
    trigger_words: list[str]
    dora: bool
    title: str | None
    embeddings: list[str] = field(default_factory=list)  # textual-inversion words loaded with the layers
    problems: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    # the file's hashes, computed on first use (a library scan reads headers only): FileHashes, or a callable
    # returning them
    hash_source: "FileHashes | Callable[[], FileHashes] | None" = field(default=None, repr=False, compare=False)

    def hashes(self) -> FileHashes:
        if not isinstance(self.hash_source, FileHashes):
            self.hash_source = self.hash_source() if self.hash_source is not None else file_hashes(Path(self.path), None)
        return self.hash_source

    @property
    def sha256(self) -> str:
        return self.hashes().sha256

    @property
    def model_hash(self) -> str:
        return self.hashes().model_hash

    @property
    def short_hash(self) -> str | None:
        return self.hashes().short_hash

    def to_json(self, hashes: bool = True) -> dict:
        """Everything but the raw metadata; `hashes=False` leaves out the hashes (they read the whole file the first
        time)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("metadata", "hash_source")}
        if hashes:
            data.update(sha256=self.sha256, model_hash=self.model_hash, short_hash=self.short_hash)
        return data

    def summary(self, hashes: bool = True) -> str:
        """A few readable lines for `studio inspect` without --json."""
        lines = [f"{self.name}  ({self.title})" if self.title else self.name,
                 f"  format      {self.format}{' + DoRA' if self.dora else ''}",
                 f"  base model  {self.base_model or 'unknown'}",
                 f"  rank        {self.rank if self.rank is not None else 'full'}"
                 f"{' (' + ', '.join(map(str, self.ranks)) + ')' if len(self.ranks) > 1 else ''}"
                 f"   alpha {self.alpha if self.alpha is not None else 'none'}",
                 f"  modules     {self.modules} ({', '.join(f'{c} {n}' for c, n in self.components.items())})",
                 f"  triggers    {', '.join(self.trigger_words) or '-'}",
                 *([f"  embeddings  {', '.join(self.embeddings)} (words the file teaches the text encoder)"]
                   if self.embeddings else []),
                 *([f"  hashes      model {self.model_hash}   short {self.short_hash or '-'}",
                    f"  sha256      {self.sha256}"] if hashes else [])]
        lines += [f"  note        {problem}" for problem in self.problems]
        return "\n".join(lines)


def pickle_refusal(path: Path) -> str:
    from studio.lora.picklescan import unsafe_imports

    unsafe = unsafe_imports(path)
    why = (f"; this one would import {', '.join(unsafe[:3])}, which is code, so it is never loaded"
           if unsafe else "; it is refused unless you opt in with allow_pickle=True, or convert it to .safetensors")
    return f"{path.name} is a pickled file ({path.suffix}), which can execute code when loaded{why}."


def inspect_lora(path: str | Path) -> LoraInfo:
    """Identify a LoRA file without loading its tensors; LoraError (one sentence) when it is unusable."""
    return inspect_with_layout(path)[0]


def inspect_with_layout(path: str | Path) -> tuple[LoraInfo, K.KeyLayout]:
    """inspect_lora's work, also returning the key layout that converters need."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path} does not exist." if not path.exists() else f"{path} is a folder, not a LoRA file."
                        if path.is_dir() else f"{path} is not a regular file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(pickle_refusal(path))
    header = read_header(path)
    layout = K.parse_keys(path.name, list(header.tensors))
    info = describe(path, layout, header.shapes(), header.metadata,
                    read_alpha=lambda key: read_scalar(path, header, key),
                    hashes=functools.partial(file_hashes, path, header.data_start))
    return info, layout


def describe(path: Path, layout: K.KeyLayout, shapes: Mapping[str, tuple[int, ...]], metadata: dict[str, str],
             read_alpha: Callable[[str], float | None],
             hashes: "FileHashes | Callable[[], FileHashes]") -> LoraInfo:
    """The LoraInfo of a parsed layout; shared by header inspection and opted-in pickles. `hashes` may be a callable:
    they are then computed when first asked for."""
    ranks = [r for r in (module_rank(m.parts, shapes) for m in layout.modules) if r is not None]
    components = Counter(m.component for m in layout.modules)
    problems = []
    base = base_model(layout, shapes, metadata)
    if base is None:
        problems.append("its base model could not be determined from its metadata or tensor shapes")
    return LoraInfo(
        path=str(path), name=path.name, format=layout.format, base_model=base,
        rank=Counter(ranks).most_common(1)[0][0] if ranks else None, ranks=sorted(set(ranks)),
        alpha=_alpha(layout, metadata, read_alpha), modules=len(layout.modules),
        components={c: components[c] for c in K.COMPONENTS if components[c]},
        has_text_encoder=any(c != K.UNET for c in components),
        trigger_words=list(dict.fromkeys([*layout.embeddings, *trigger_words(metadata)])),
        dora=any("magnitude" in m.parts for m in layout.modules),
        title=metadata.get("modelspec.title") or metadata.get("ss_output_name") or None,
        embeddings=list(layout.embeddings), problems=problems, metadata=metadata, hash_source=hashes)


def module_rank(parts: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The inner dimension of a module's factorisation; None for a LoKr whose two factors are full."""
    for role in ("down", "lokr_w2_b", "lokr_w1_b", "hada_w1_b"):
        if role in parts:
            return shapes[parts[role]][0]
    return None


def module_in_features(parts: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Input width of a linear module, from its factors' shapes."""
    if "down" in parts:
        return shapes[parts["down"]][1]
    if "hada_w1_b" in parts:
        return shapes[parts["hada_w1_b"]][1]
    w1 = parts.get("lokr_w1") or parts.get("lokr_w1_b")
    w2 = parts.get("lokr_w2") or parts.get("lokr_w2_b")
    if w1 and w2:
        return shapes[w1][1] * shapes[w2][1]
    return None


def base_model(layout: K.KeyLayout, shapes: Mapping[str, tuple[int, ...]], metadata: dict[str, str]) -> str | None:
    """Metadata first (kohya's ss_base_model_version / ss_v2, then modelspec), then the key layout
    (SDXL's two text encoders and LDM block names), then the cross-attention width."""
    return (_base_from_metadata(metadata) or _base_from_names(layout) or _base_from_cross_attention(layout, shapes)
            or _base_from_text_encoder(layout, shapes))


def _base_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "").lower()
    if version.startswith("sdxl"):
        return FAMILY_SDXL
    if version.startswith("sd_v2"):
        return FAMILY_SD2
    if version.startswith("sd_v1"):
        return FAMILY_SD1
    if version.startswith("shapes_world"):
        return FAMILY_SHAPES
    if metadata.get("ss_v2", "").lower() == "true":
        return FAMILY_SD2
    architecture = metadata.get("modelspec.architecture", "").lower()
    for marker, family in (("stable-diffusion-xl", FAMILY_SDXL), ("stable-diffusion-v2", FAMILY_SD2),
                           ("stable-diffusion-v1", FAMILY_SD1), ("shapes-world", FAMILY_SHAPES)):
        if architecture.startswith(marker):
            return family
    return None


def _base_from_names(layout: K.KeyLayout) -> str | None:
    if any(m.component == K.TEXT_ENCODER_2 for m in layout.modules):
        return FAMILY_SDXL
    ldm_blocks = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    if any(m.module_id.startswith(ldm_blocks) or m.module_id.startswith("lora_te1_") for m in layout.modules):
        return FAMILY_SDXL  # kohya trains SD1/SD2 on diffusers names and SDXL on the LDM UNet
    return None


def _base_from_cross_attention(layout: K.KeyLayout, shapes) -> str | None:
    if layout.format == K.CLONEOFSIMO:
        return _base_from_unnamed_widths(layout, shapes)
    for module in layout.modules:
        if module.component == K.UNET and K.is_cross_attention_key(layout.format, module.module_id):
            return CROSS_ATTENTION_WIDTH.get(module_in_features(module.parts, shapes))
    return None


def _base_from_unnamed_widths(layout: K.KeyLayout, shapes) -> str | None:
    """cloneofsimo files name no module; the text width is the one UNet input width that no UNet
    layer outputs (768 among 320/640/1280 for SD1.x)."""
    unet = [m for m in layout.modules if m.component == K.UNET]
    inputs = {shapes[m.parts["down"]][1] for m in unet}
    outputs = {shapes[m.parts["up"]][0] for m in unet}
    candidates = [w for w in inputs - outputs if w in CROSS_ATTENTION_WIDTH]
    return CROSS_ATTENTION_WIDTH[candidates[0]] if len(candidates) == 1 else None


def _base_from_text_encoder(layout: K.KeyLayout, shapes) -> str | None:
    """Every self-attention projection of the text encoder reads its hidden width."""
    widths = {module_in_features(m.parts, shapes) for m in layout.modules
              if m.component == K.TEXT_ENCODER and ("self_attn" in m.module_id or layout.format == K.CLONEOFSIMO)}
    return TEXT_ENCODER_WIDTH.get(widths.pop()) if len(widths) == 1 else None


def _alpha(layout: K.KeyLayout, metadata: dict[str, str], read_alpha) -> float | None:
    values = [read_alpha(m.parts["alpha"]) for m in layout.modules if "alpha" in m.parts]
    values = [v for v in values if v is not None]
    if values:
        return Counter(values).most_common(1)[0][0]
    peft = peft_metadata(metadata, K.UNET) or peft_metadata(metadata, K.TEXT_ENCODER)
    if "lora_alpha" in peft:
        return float(peft["lora_alpha"])
    try:
        return float(metadata["ss_network_alpha"])
    except (KeyError, ValueError):
        return None


def peft_metadata(metadata: dict[str, str], component: str) -> dict:
    """The LoraConfig fields diffusers stores per component under `lora_adapter_metadata`."""
    try:
        packed = json.loads(metadata.get(PEFT_METADATA_KEY) or "{}")
    except ValueError:
        return {}
    prefix = f"{component}."
    return {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)} if isinstance(packed, dict) else {}


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Our own `ss_trigger_words`, modelspec's trigger phrase, then the most frequent training tags."""
    words = [*_split_words(metadata.get("ss_trigger_words", "")),
             *_split_words(metadata.get("modelspec.trigger_phrase", "")),
             *_top_tags(metadata.get("ss_tag_frequency", ""))]
    return list(dict.fromkeys(w for w in words if w))


def _split_words(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(w).strip() for w in json.loads(value)]
        except ValueError:
            pass
    return [w.strip() for w in value.split(",")] if value else []


def _top_tags(raw: str) -> list[str]:
    try:
        frequency = json.loads(raw) if raw else {}
    except ValueError:
        return []
    totals: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            totals.update({str(tag).strip(): int(n) for tag, n in tags.items() if isinstance(n, (int, float))})
    return [tag for tag, _ in totals.most_common(TOP_TAGS)]
