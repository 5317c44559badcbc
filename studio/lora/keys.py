"""LoRA file formats at the level of tensor NAMES: which format a file is, and which of its keys
belong to which module in which role. Nothing here loads tensors or imports torch, so that
`studio inspect` stays a header read."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from studio.errors import LoraError

KOHYA = "kohya"
LOKR = "lycoris_lokr"
LOHA = "lycoris_loha"
DIFFUSERS = "diffusers"
LEGACY_ATTN_PROCS = "legacy_attn_procs"
CLONEOFSIMO = "cloneofsimo"

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT_ENCODER, "lora_te1_": TEXT_ENCODER, "lora_te2_": TEXT_ENCODER_2}
# kohya / LyCORIS per-module suffix -> role in LoraModule terms (down/up/mid/alpha/magnitude) or the
# LyCORIS factor's own name.
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
               "dora_scale": "magnitude",
               **{s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}}

# diffusers-family key endings: PEFT (`lora_A[.adapter].weight`), diffusers 0.2x (`lora.down.weight`,
# `lora_linear_layer.down.weight`), attention processors (`processor.to_q_lora.down.weight`, kept in
# the module id because diffusers' own converters need it), DoRA magnitudes and network alphas.
_DIFFUSERS_ROLE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"lora_(?P<peft>[AB])(?:\.[^.]+)?\.weight"
    r"|(?:lora|lora_linear_layer)\.(?P<old>down|up)\.weight"
    r"|(?P<proc>to_(?:q|k|v|out)_lora)\.(?P<proc_role>down|up)\.weight"
    r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?"
    r"|(?P<alpha>alpha))$")
_CLONEOFSIMO_KEY = re.compile(r"^(?P<component>unet|text_encoder|text_encoder_2):(?P<index>\d+):(?P<role>up|down)$")
_CLONEOFSIMO_EMBEDDING = re.compile(r"^<[^>]+>$")  # its textual-inversion tokens, e.g. "<s1>"
# Textual-inversion embeddings bundled in a kohya LoRA (pivotal tuning; A1111 loads them with the LoRA):
# `bundle_emb.<word>.string_to_param.*` (SD1/2, vectors × width) or `bundle_emb.<word>.clip_l` / `.clip_g` (SDXL).
BUNDLE_EMBEDDING = "bundle_emb."
_BUNDLE_EMBEDDING_KEY = re.compile(r"^bundle_emb\.(?P<word>[^.]+)\.(?:string_to_param\..+|(?P<clip>clip_[lg]))$")
_BUNDLE_COMPONENT = {None: TEXT_ENCODER, "clip_l": TEXT_ENCODER, "clip_g": TEXT_ENCODER_2}


@dataclass
class ModuleKeys:
    """The keys of one adapted layer: `parts` maps a role (down, up, mid, alpha, magnitude, lokr_w1_a,
    hada_w1_a, ...) to the tensor name in the file."""
    module_id: str  # as the file names it: kohya name, diffusers path, or "unet:17"
    component: str
    parts: dict[str, str] = field(default_factory=dict)


@dataclass
class KeyLayout:
    format: str
    modules: list[ModuleKeys]
    # textual-inversion words the file brings with its layers: word -> {text encoder component: tensor name}
    embeddings: dict[str, dict[str, str]] = field(default_factory=dict)


def parse_keys(name: str, keys: list[str]) -> KeyLayout:
    """Identify the format of a file from its tensor names and group them by module; a LoraError with
    one sentence when the file is not a usable LoRA."""
    if not keys:
        raise LoraError(f"{name} contains no tensors.")
    _refuse_non_lora(name, keys)
    if any(k.startswith((*KOHYA_PREFIXES, BUNDLE_EMBEDDING)) for k in keys):
        return _parse_kohya(name, keys)
    if any(_CLONEOFSIMO_KEY.match(k) for k in keys):
        return _parse_cloneofsimo(name, keys)
    if any(_DIFFUSERS_ROLE.match(k) for k in keys):
        return _parse_diffusers(name, keys)
    raise LoraError(f"{name} is not a LoRA this studio recognises: none of its {len(keys)} tensor names "
                    f"(e.g. {_example(keys)}) follows the kohya, LyCORIS, diffusers/PEFT, attention-processor or "
                    "cloneofsimo naming.")


def _example(keys: list[str]) -> str:
    key = sorted(keys)[0]
    return repr(key if len(key) <= 90 else key[:87] + "...")


def _refuse_non_lora(name: str, keys: list[str]) -> None:
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        raise LoraError(f"{name} is a full Stable Diffusion checkpoint, not a LoRA; load it as a base model instead.")
    if any(k.startswith(("transformer.", "diffusion_model.", "lora_unet_double_blocks", "lora_unet_single_blocks"))
           for k in keys):
        raise LoraError(f"{name} is a LoRA for a transformer-based model (Flux, SD3 and the like), which this studio "
                        "does not support.")


def _parse_kohya(name: str, keys: list[str]) -> KeyLayout:
    modules: dict[str, ModuleKeys] = {}
    embeddings: dict[str, dict[str, str]] = {}
    for key in keys:
        if key.startswith(BUNDLE_EMBEDDING):
            match = _BUNDLE_EMBEDDING_KEY.match(key)
            if match is None:
                raise LoraError(f"{name} has a bundled embedding key of an unknown form ({key!r}); the studio reads "
                                "bundle_emb.<word>.string_to_param.* and bundle_emb.<word>.clip_l / .clip_g.")
            component = _BUNDLE_COMPONENT[match["clip"]]
            if component in embeddings.get(match["word"], {}):
                raise LoraError(f"{name} bundles the embedding {match['word']!r} twice for one text encoder.")
            embeddings.setdefault(match["word"], {})[component] = key
            continue
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        module_id, _, suffix = key.partition(".")
        role = KOHYA_ROLES.get(suffix)
        if prefix is None or role is None:
            raise LoraError(_kohya_problem(name, key, prefix, suffix))
        entry = modules.setdefault(module_id, ModuleKeys(module_id, KOHYA_PREFIXES[prefix]))
        entry.parts[role] = key
    for entry in modules.values():
        _check_kohya_module(name, entry)
    roles = {role for m in modules.values() for role in m.parts}
    fmt = LOKR if any(r.startswith("lokr_") for r in roles) else LOHA if any(r.startswith("hada_") for r in roles) \
        else KOHYA
    if not modules:
        raise LoraError(f"{name} holds only textual-inversion embeddings ({', '.join(embeddings)}) and no LoRA layer.")
    return KeyLayout(fmt, list(modules.values()), embeddings)


def _kohya_problem(name: str, key: str, prefix: str | None, suffix: str) -> str:
    if prefix is None:
        return (f"{name} mixes kohya keys with a key of no known kohya prefix ({key!r}); only lora_unet_, lora_te_, "
                "lora_te1_ and lora_te2_ are understood.")
    if re.search(r"_lora_(down|up)\.weight$", key):
        return (f"{name} is a malformed kohya LoRA: its keys end in '_lora_down.weight' instead of "
                f"'.lora_down.weight' (e.g. {key!r}), so no layer can be identified from them.")
    return (f"{name} has a kohya key with an unsupported part {suffix!r} ({key!r}); the studio reads LoRA/LoCon, "
            "LoKr and LoHa modules only.")


def _check_kohya_module(name: str, entry: ModuleKeys) -> None:
    parts = entry.parts
    complete = ("down" in parts and "up" in parts) \
        or (("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys())
            and ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys())) \
        or {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts.keys()
    if not complete:
        raise LoraError(f"{name} is an incomplete kohya LoRA: module {entry.module_id!r} has only "
                        f"{', '.join(sorted(parts))}.")


def _parse_diffusers(name: str, keys: list[str]) -> KeyLayout:
    modules: dict[str, ModuleKeys] = {}
    legacy = False
    for key in keys:
        match = _DIFFUSERS_ROLE.match(key)
        if match is None:
            raise LoraError(f"{name} mixes diffusers LoRA keys with a key that is not one ({key!r}).")
        module_id = match["module"]
        if match["proc"]:
            module_id = f"{module_id}.{match['proc']}"
            legacy = legacy or ".processor." in key
        role = _diffusers_role(match)
        component, _ = split_component(module_id)
        entry = modules.setdefault(module_id, ModuleKeys(module_id, component))
        entry.parts[role] = key
    for entry in modules.values():
        if not {"down", "up"} <= entry.parts.keys():
            raise LoraError(f"{name} is an incomplete diffusers LoRA: module {entry.module_id!r} has only "
                            f"{', '.join(sorted(entry.parts))}.")
    return KeyLayout(LEGACY_ATTN_PROCS if legacy else DIFFUSERS, list(modules.values()))


def _diffusers_role(match: re.Match) -> str:
    if match["peft"]:
        return "down" if match["peft"] == "A" else "up"
    if match["old"] or match["proc_role"]:
        return match["old"] or match["proc_role"]
    return "alpha" if match["alpha"] else "magnitude"


def split_component(module_id: str) -> tuple[str, str]:
    """("text_encoder", "text_model.encoder...") from a diffusers module id; un-prefixed ids (attention
    processors, PEFT UNet saves) belong to the UNet."""
    head, _, rest = module_id.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return UNET, module_id


def _parse_cloneofsimo(name: str, keys: list[str]) -> KeyLayout:
    modules: dict[str, ModuleKeys] = {}
    embeddings = {}
    for key in keys:
        match = _CLONEOFSIMO_KEY.match(key)
        if match is None:
            if _CLONEOFSIMO_EMBEDDING.match(key):  # lora_pti's learnt tokens: one vector for the text encoder
                embeddings[key] = {TEXT_ENCODER: key}
                continue
            raise LoraError(f"{name} mixes cloneofsimo LoRA keys with a key that is not one ({key!r}).")
        module_id = f"{match['component']}:{match['index']}"
        entry = modules.setdefault(module_id, ModuleKeys(module_id, match["component"]))
        entry.parts[match["role"]] = key
    incomplete = [m.module_id for m in modules.values() if set(m.parts) != {"up", "down"}]
    if incomplete:
        raise LoraError(f"{name} is an incomplete cloneofsimo LoRA: module {incomplete[0]} lacks its up or down "
                        "matrix.")
    return KeyLayout(CLONEOFSIMO, sorted(modules.values(), key=cloneofsimo_sort_key), embeddings)


def cloneofsimo_sort_key(entry: ModuleKeys) -> tuple[int, int]:
    component, index = entry.module_id.split(":")
    return COMPONENTS.index(component), int(index)


def is_cross_attention_key(layout_format: str, module_id: str) -> bool:
    """The module whose input width is the text encoder's width: attn2.to_k of a transformer block."""
    if layout_format in (KOHYA, LOKR, LOHA):
        return module_id.endswith("attn2_to_k")
    return module_id.endswith(("attn2.to_k", "attn2.processor.to_k_lora", "attn2.to_k_lora"))
