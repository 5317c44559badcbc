"""cloneofsimo/lora files number their layers (`unet:17:up`) instead of naming them. The project
injected into every nn.Linear inside modules of the listed classes (metadata `unet` /
`text_encoder`, e.g. ["CrossAttention", "Attention", "GEGLU"]), walking `model.modules()` of the
diffusers and transformers of early 2023. That order is rebuilt here from SD1.5's architecture and
accepted only when every layer's (in, out) shape matches it, and no other candidate order fits."""
from __future__ import annotations

import json
import re
from functools import lru_cache

from studio.errors import LoraError
from studio.lora import keys as K
from studio.models import FAMILY_SD1

DEFAULT_CLASSES = {K.UNET: ["CrossAttention", "Attention", "GEGLU"], K.TEXT_ENCODER: ["CLIPAttention"]}
# diffusers < 0.15 registered a BasicTransformerBlock's children as attn1, ff, attn2 (norms after);
# today it is attn1, attn2, ff. The shapes decide which one a file used.
LEGACY_BLOCK_ORDER = ("attn1", "ff", "attn2")
_BLOCK_CHILD = re.compile(r"^(?P<block>.*\.transformer_blocks\.\d+)\.(?P<child>[^.]+)")

Layer = tuple[str, int, int]  # module path, in_features, out_features


def cloneofsimo_targets(name: str, layout: K.KeyLayout, shapes, metadata: dict[str, str],
                        base: str | None) -> dict[str, tuple[str, str]]:
    """module id ("unet:17") -> (component, module path), or an 'unsupported format' LoraError."""
    if base != FAMILY_SD1:
        raise LoraError(f"{name} is a cloneofsimo/lora file made for {base or 'an unknown base model'}; its unnamed "
                        "layers can only be placed on SD1.x, so this format is unsupported for it.")
    if any(len(shapes[m.parts["down"]]) != 2 for m in layout.modules):
        raise LoraError(f"{name} is a cloneofsimo/lora file with convolution layers, whose order cannot be "
                        "recovered; unsupported format.")
    targets = {}
    for component in dict.fromkeys(m.component for m in layout.modules):
        entries = [m for m in layout.modules if m.component == component]
        order = _recover_order(name, component, entries, shapes, _target_classes(metadata, component))
        targets.update({m.module_id: (component, path) for m, path in zip(entries, order)})
    return targets


def _recover_order(name: str, component: str, entries: list[K.ModuleKeys], shapes, classes: list[str]) -> list[str]:
    if component not in (K.UNET, K.TEXT_ENCODER):
        raise LoraError(f"{name} is a cloneofsimo/lora file with {component} layers, which SD1.x does not have; "
                        "unsupported format.")
    found = [(shapes[m.parts["down"]][1], shapes[m.parts["up"]][0]) for m in entries]
    fitting = [order for order in candidate_orders(component, tuple(classes))
               if [(i, o) for _, i, o in order] == found]
    indices = [int(m.module_id.split(":")[1]) for m in entries]
    if len(fitting) != 1 or indices != list(range(len(entries))):
        raise LoraError(f"{name} is a cloneofsimo/lora file whose {len(entries)} {component} layers do not line up "
                        "with SD1.5's layers in one known order; unsupported format.")
    return [path for path, _, _ in fitting[0]]


def _target_classes(metadata: dict[str, str], component: str) -> list[str]:
    try:
        classes = json.loads(metadata[component])
        return [str(c) for c in classes] if isinstance(classes, list) else DEFAULT_CLASSES.get(component, [])
    except (KeyError, ValueError):
        return DEFAULT_CLASSES.get(component, [])


@lru_cache(maxsize=8)
def candidate_orders(component: str, classes: tuple[str, ...]) -> list[list[Layer]]:
    """The layer orders cloneofsimo's `_find_modules` produced on SD1.5: today's module order and the
    pre-0.15 diffusers one (distinct candidates only)."""
    groups = _ancestor_groups(_sd15_skeleton(component), set(classes))
    orders = [_flatten(groups), _flatten(_legacy_block_order(groups))]
    return [order for i, order in enumerate(orders) if order not in orders[:i]]


def _ancestor_groups(model, classes: set[str]) -> list[tuple[str, list[Layer]]]:
    from torch import nn

    groups = []
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            linears = [(f"{path}.{sub}", m.in_features, m.out_features)
                       for sub, m in module.named_modules() if sub and isinstance(m, nn.Linear)]
            groups.append((path, linears))
    return groups


def _legacy_block_order(groups: list[tuple[str, list[Layer]]]) -> list[tuple[str, list[Layer]]]:
    """Reorder the groups inside each transformer block as attn1, ff, attn2."""
    def rank(group):
        match = _BLOCK_CHILD.match(group[0])
        child = match["child"] if match else ""
        return LEGACY_BLOCK_ORDER.index(child) if child in LEGACY_BLOCK_ORDER else len(LEGACY_BLOCK_ORDER)

    ordered, run, run_block = [], [], None
    for group in groups:
        match = _BLOCK_CHILD.match(group[0])
        block = match["block"] if match else None
        if block != run_block or block is None:
            ordered += sorted(run, key=rank)
            run, run_block = [], block
        run.append(group)
    return ordered + sorted(run, key=rank)


def _flatten(groups: list[tuple[str, list[Layer]]]) -> list[Layer]:
    return [layer for _, layers in groups for layer in layers]


def _sd15_skeleton(component: str):
    """SD1.5's UNet or text encoder on the meta device: its structure without memory or init time."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.architectures import CLIP_L, SD15_UNET

    with init_empty_weights():
        if component == K.UNET:
            return UNet2DConditionModel(**SD15_UNET)
        return CLIPTextModel(CLIPTextConfig(**CLIP_L))
