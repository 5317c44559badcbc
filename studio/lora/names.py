"""Module paths of kohya and diffusers-family LoRA keys, as the pipeline's components name their
modules. The renaming itself is diffusers' (lora_conversion_utils and state_dict_utils): each
module's key is pushed through the same converters `load_lora_weights` uses, ending in PEFT naming
(`<module path>.lora_A.weight`), and the path is read off that."""
from __future__ import annotations

import re
from types import SimpleNamespace

from studio.errors import LoraError
from studio.lora import keys as K

_PEFT_DOWN_SUFFIX = re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$")


def kohya_targets(name: str, module_ids: list[str]) -> dict[str, tuple[str, str]]:
    """kohya module name (e.g. lora_unet_down_blocks_0_attentions_0_proj_in, lora_te2_text_model_...)
    -> (component, module path); SDXL's LDM block names (input_blocks_4_1_...) included."""
    from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key, _convert_unet_lora_key

    probes = {f"{module_id}.lora_down.weight": module_id for module_id in module_ids}
    targets = {}
    for probe, ldm_free in _map_ldm_blocks(name, [p for p in probes if p.startswith("lora_unet_")]).items():
        targets[probes[probe]] = (K.UNET, _peft_path(name, K.UNET, _convert_unet_lora_key(ldm_free)))
    for probe, module_id in probes.items():
        component = next((c for prefix, c in K.KOHYA_PREFIXES.items() if module_id.startswith(prefix)), K.UNET)
        if component != K.UNET:
            path = _peft_path(name, component, _convert_text_encoder_lora_key(probe, module_id))
            targets[module_id] = (component, text_encoder_path(component, path))
    missing = [m for m in module_ids if m not in targets]
    if missing:
        raise LoraError(f"{name} mixes LDM-style and diffusers-style UNet names (e.g. {missing[0]!r}), so its "
                        "layers cannot be placed.")
    return targets


def _map_ldm_blocks(name: str, unet_probes: list[str]) -> dict[str, str]:
    """probe -> the same probe with SDXL's input/middle/output_blocks renamed to diffusers blocks."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from studio.architectures import SDXL_UNET

    # Only SDXL LoRAs use LDM names (kohya trains SD1/SD2 on diffusers' UNet), so SDXL's layout applies.
    unet_config = SimpleNamespace(layers_per_block=SDXL_UNET["layers_per_block"])
    try:
        renamed = _maybe_map_sgm_blocks_to_diffusers({p: p for p in unet_probes}, unet_config)
    except (ValueError, IndexError) as exc:
        raise LoraError(f"{name} has LDM-style UNet names that do not match SDXL's blocks ({exc}).") from exc
    return {probe: new for new, probe in renamed.items()}


def diffusers_targets(name: str, modules: list[K.ModuleKeys]) -> dict[str, tuple[str, str]]:
    """diffusers / PEFT / attention-processor module id -> (component, module path)."""
    targets = {}
    for module in modules:
        component, _ = K.split_component(module.module_id)
        down_key = module.parts["down"].removeprefix(f"{component}.")
        if component == K.UNET:  # B4M's fused checkpoints (diffusers 0.22 era) say `unet.unet.<block>...`
            down_key = down_key.removeprefix("unet.")
        path = _peft_path(name, component, down_key).removeprefix("base_model.model.")  # raw PEFT saves
        targets[module.module_id] = (component, text_encoder_path(component, path) if component != K.UNET else path)
    return targets


def _peft_path(name: str, component: str, key: str) -> str:
    """The module path of a down-matrix key of any diffusers generation, via diffusers' own mappings:
    `processor.to_q_lora.down` -> `to_q.lora_A` (UNet), `to_q_lora.down` -> `q_proj.lora_A` (text
    encoders), `lora.down` / `lora_linear_layer.down` -> `lora_A`."""
    from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, convert_state_dict,
                                                  convert_unet_state_dict_to_peft)

    state = {key: None}
    if component != K.UNET:
        state = convert_state_dict(state, DIFFUSERS_OLD_TO_PEFT)
    peft_key = next(iter(convert_unet_state_dict_to_peft(state)))
    path, found = _PEFT_DOWN_SUFFIX.subn("", peft_key)
    if not found:
        raise LoraError(f"{name} has a key diffusers cannot map to a module ({key!r}).")
    return path


def text_encoder_path(component: str, path: str) -> str:
    """transformers 5 dropped the `text_model.` level from CLIPTextModel (SD1/SD2 `text_encoder`) but
    not from CLIPTextModelWithProjection (SDXL `text_encoder_2`); files name it either way."""
    inner = path.removeprefix("text_model.")
    if component == K.TEXT_ENCODER_2 and not inner.startswith("text_projection"):
        return f"text_model.{inner}"
    return inner
