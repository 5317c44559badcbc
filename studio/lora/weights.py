"""One in-memory representation of a LoRA, whatever file format it came from: a LoraModule per
adapted layer, keyed by (component, module path as that component's `named_modules()` spells it).
Every composer, and the studio's own injection, consumes only this."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from studio.errors import LoraError
from studio.lora import keys as K
from studio.lora.cloneofsimo import cloneofsimo_targets
from studio.lora.hashes import file_hashes
from studio.lora.inspect import PICKLE_SUFFIXES, LoraInfo, describe, inspect_with_layout, peft_metadata, pickle_refusal
from studio.lora.names import diffusers_targets, kohya_targets
from studio.lora.picklescan import unsafe_imports


@dataclass
class LoraModule:
    component: str        # "unet" | "text_encoder" | "text_encoder_2"
    target: str           # path in that component's named_modules(), e.g. "mid_block.attentions.0.proj_in"
    down: Tensor | None   # A: (rank, in) or conv (rank, in, kh, kw); (rank, in, 1, 1) when `mid` is set
    up: Tensor | None     # B: (out, rank) or conv (out, rank, 1, 1)
    mid: Tensor | None    # LoCon-CP middle kernel (rank, rank, kh, kw), if any
    dense: Tensor | None  # dense ΔW (LoKr kron / LoHa Hadamard); reshaped to the layer's weight on use
    scale: float          # alpha / rank (1 without alpha), NOT including the user's weight
    magnitude: Tensor | None = None  # DoRA magnitude, if any
    kron: tuple[Tensor, Tensor] | None = None  # LoKr (w1, w2), kept factored: ΔW = kron(w1, w2)

    @property
    def is_low_rank(self) -> bool:
        return self.down is not None

    def tensors(self) -> list[Tensor]:
        kron = self.kron or ()
        return [t for t in (self.down, self.up, self.mid, self.dense, self.magnitude, *kron) if t is not None]

    def delta_weight(self, base_weight: Tensor | None = None) -> Tensor:
        """scale·(B@A) (or scale·dense) reshaped to the layer; for DoRA the full W'−W, which needs the
        layer's own weight."""
        delta = self.unscaled_delta()
        if self.scale != 1.0:  # a dense ΔW can be as large as the layer: no copy when there is nothing to scale
            delta = delta * self.scale
        if base_weight is not None:
            if delta.numel() != base_weight.numel():
                raise ValueError(f"ΔW of {self.target} has {delta.numel()} values, the layer {base_weight.numel()}")
            delta = delta.reshape(base_weight.shape)
        if self.magnitude is not None:
            if base_weight is None:
                raise ValueError(f"the DoRA update of {self.target} depends on the layer's weight; pass base_weight")
            delta = dora_delta(base_weight.to(delta.dtype), delta, self.magnitude.to(delta.dtype))
        return delta

    def unscaled_delta(self) -> Tensor:
        """ΔW before scaling, materialised: the dense update, kron(w1, w2), or B@A."""
        if self.dense is not None:
            return self.dense
        if self.kron is not None:
            w1, w2 = self.kron
            return torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
        return self.low_rank_product()

    def low_rank_product(self) -> Tensor:
        """B@A (unscaled), as a conv kernel for conv LoRAs."""
        up = self.up.flatten(1)
        if self.mid is not None:
            return torch.einsum("or,rshw,si->oihw", up, self.mid, self.down.flatten(1))
        product = up @ self.down.flatten(1)
        return product.reshape(up.shape[0], *self.down.shape[1:]) if self.down.dim() == 4 else product


def dora_delta(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """W' − W with W' = m · (W + ΔW) / ‖W + ΔW‖. PEFT (`lora_magnitude_vector`, shape (out,)) and
    LyCORIS with wd_on_out (`dora_scale` (out, 1, …)) norm each output row; A1111-era LyCORIS
    (`dora_scale` (1, in, …)) norms each input column. The magnitude's shape says which."""
    merged = weight + delta
    extra = [1] * (weight.dim() - 2)
    if magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.shape[1] == weight.shape[1]:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *extra)
    else:
        norm = merged.flatten(1).norm(dim=1).reshape(weight.shape[0], 1, *extra)
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


@dataclass
class LoraWeights:
    name: str
    info: LoraInfo
    modules: dict[tuple[str, str], LoraModule]
    # textual-inversion words the file brings: word -> {text encoder component: vectors (n, width)}
    embeddings: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def parameter_count(self) -> int:
        """Every value the LoRA adds: its layers' factors and its words' vectors."""
        return sum(t.numel() for m in self.modules.values() for t in m.tensors()) + self.embedding_parameter_count()

    def embedding_parameter_count(self) -> int:
        return sum(v.numel() for per_component in self.embeddings.values() for v in per_component.values())

    def to_peft_state_dict(self) -> dict[str, Tensor]:
        """diffusers-format keys (`unet.<target>.lora_A.weight`, ...) for `pipe.load_lora_weights`, with
        each module's scale folded into B so that PEFT's default alpha = r reproduces it."""
        state = {}
        for (component, target), module in self.modules.items():
            if not module.is_low_rank:
                raise LoraError(f"{self.info.name} is a {self.info.format} LoRA (a dense ΔW per layer), which PEFT "
                                "cannot load; attach it with the studio's own injection instead.")
            prefix = f"{component}.{target}"
            state[f"{prefix}.lora_A.weight"] = _fold_mid(module.down, module.mid)
            state[f"{prefix}.lora_B.weight"] = module.up * module.scale
            if module.magnitude is not None:
                if module.magnitude.dim() != 1:
                    raise LoraError(f"{self.info.name} has LyCORIS DoRA magnitudes, which PEFT cannot load; attach it "
                                    "with the studio's own injection instead.")
                state[f"{prefix}.lora_magnitude_vector.weight"] = module.magnitude
        return state


def _fold_mid(down: Tensor, mid: Tensor | None) -> Tensor:
    """LoCon-CP: a 1×1 down conv followed by a k×k mid conv is one k×k conv of rank(mid) outputs."""
    if mid is None:
        return down
    return torch.einsum("rshw,si->rihw", mid, down.flatten(1))


def load_lora(path: str | Path, allow_pickle: bool = False) -> LoraWeights:
    """Read a LoRA file of any supported format into LoraWeights; LoraError (one sentence) otherwise.
    Pickled .pt/.ckpt/.bin files can execute code when unpickled: refused unless `allow_pickle`, and
    even then read with `weights_only=True`."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle or unsafe_imports(path):  # opted in or not, a pickle that imports code is never loaded
            raise LoraError(pickle_refusal(path))
        info, layout, tensors = _read_pickle(path)
    else:
        info, layout = inspect_with_layout(path)
        tensors = _read_safetensors(path)
    _check_finite(path, tensors)
    return LoraWeights(name=path.stem, info=info, modules=build_modules(info, layout, tensors),
                       embeddings=build_embeddings(layout, tensors))


def _check_finite(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """A NaN or infinity anywhere in a LoRA spreads through every layer it touches and makes a black image."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"{path.name} holds NaN or infinite values (in {key}); it would ruin every image, so it "
                            "is refused.")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"{path.name} has a valid header but its tensors cannot be read ({_first_line(exc)}).") from exc


def _read_pickle(path: Path):
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling raises many types; weights_only refusals included
        raise LoraError(f"{path.name} could not be read as plain tensors with weights_only=True "
                        f"({_first_line(exc)}).") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraError(f"{path.name} holds a {type(data).__name__}, not a mapping of names to tensors.")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, Tensor)}
    layout = K.parse_keys(path.name, list(tensors))
    info = describe(path, layout, {k: tuple(v.shape) for k, v in tensors.items()}, {},
                    read_alpha=lambda key: float(tensors[key].item()) if tensors[key].numel() == 1 else None,
                    hashes=file_hashes(path, None))
    return info, layout, tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def build_modules(info: LoraInfo, layout: K.KeyLayout,
                  tensors: Mapping[str, Tensor]) -> dict[tuple[str, str], LoraModule]:
    """Convert a parsed file into LoraModules, naming each layer as the pipeline's modules do."""
    if layout.format in (K.KOHYA, K.LOKR, K.LOHA):
        targets = kohya_targets(info.name, [m.module_id for m in layout.modules])
    elif layout.format == K.CLONEOFSIMO:
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        targets = cloneofsimo_targets(info.name, layout, shapes, info.metadata, info.base_model)
    else:
        targets = diffusers_targets(info.name, layout.modules)
    modules = {}
    for entry in layout.modules:
        component, target = targets[entry.module_id]
        parts = {role: tensors[key].float() for role, key in entry.parts.items()}
        module = _module_from_parts(component, target, parts, _default_scale(info, component, target, parts))
        if (component, target) in modules:
            raise LoraError(f"{info.name} adapts {component}.{target} twice (keys of {entry.module_id!r}).")
        modules[(component, target)] = module
    return modules


def build_embeddings(layout: K.KeyLayout, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The file's textual-inversion words as (vectors, width) float tensors per text encoder."""
    return {word: {component: tensors[key].float().reshape(-1, tensors[key].shape[-1])
                   for component, key in per_encoder.items()}
            for word, per_encoder in layout.embeddings.items()}


def _default_scale(info: LoraInfo, component: str, target: str, parts: Mapping[str, Tensor]) -> float | None:
    """The scale of a module without its own `alpha`: from diffusers' PEFT config if the file has one."""
    config = peft_metadata(info.metadata, component)
    if "down" not in parts or "lora_alpha" not in config:
        return None
    rank = parts["down"].shape[0]
    alpha = float(_pattern_value(config.get("alpha_pattern"), target, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns, target: str, default):
    """PEFT's rank/alpha patterns match a module path by its dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", target):
            return value
    return default


def _module_from_parts(component: str, target: str, t: dict[str, Tensor], default_scale: float | None) -> LoraModule:
    alpha = float(t["alpha"].item()) if "alpha" in t else None
    magnitude = t.get("magnitude")
    if "down" in t:
        rank = t["down"].shape[0]
        scale = alpha / rank if alpha else (default_scale or 1.0)
        return LoraModule(component, target, t["down"], t["up"], t.get("mid"), None, scale, magnitude)
    if any(role.startswith("lokr_") for role in t):
        return LoraModule(component, target, None, None, None, None, _lokr_scale(t, alpha), magnitude,
                          kron=(_lokr_factor(t, 1).contiguous(), _lokr_factor(t, 2).contiguous()))
    rank = t["hada_w1_b"].shape[0]
    scale = alpha / rank if alpha else 1.0
    if "hada_t1" in t or "hada_t2" in t:
        return LoraModule(component, target, None, None, None, _loha_product(t), scale, magnitude)
    down, up = _loha_as_low_rank(t)
    return LoraModule(component, target, down, up, None, None, scale, magnitude)


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LyCORIS' CP rebuild: core (r, r, kh, kw) with a (r, out) and b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, a, b)


def _lokr_factor(t: dict[str, Tensor], n: int) -> Tensor:
    if f"lokr_w{n}" in t:
        return t[f"lokr_w{n}"]
    a, b = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"]
    return _tucker(t["lokr_t2"], a, b) if n == 2 and "lokr_t2" in t else a @ b


def _lokr_scale(t: dict[str, Tensor], alpha: float | None) -> float:
    """LyCORIS: alpha / dim when a factor is decomposed (dim = its inner size); 1 when both factors are
    full matrices, whatever alpha says."""
    factorised = t.get("lokr_w2_b", t.get("lokr_w1_b"))
    if factorised is None or not alpha:
        return 1.0
    return alpha / factorised.shape[0]


def _loha_as_low_rank(t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(w1a@w1b) ⊙ (w2a@w2b) is exactly a rank r1·r2 LoRA (Khatri–Rao products of the factors):
    up[:, (j, k)] = w1a[:, j]·w2a[:, k], down[(j, k), :] = w1b[j]·w2b[k]. No dense ΔW is ever built."""
    w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"].flatten(1), t["hada_w2_a"], t["hada_w2_b"].flatten(1)
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return down, up


def _loha_product(t: dict[str, Tensor]) -> Tensor:
    if "hada_t1" in t and "hada_t2" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return w1 * w2
