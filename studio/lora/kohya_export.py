"""Writing LoRAs in kohya format (the format most files in the wild use), with `ss_*` metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch

KOHYA_COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_module_name(component: str, target: str) -> str:
    """kohya names text-encoder layers from `text_model.` (as transformers < 5 did) and joins with "_"."""
    if component != "unet" and not target.startswith(("text_model.", "text_projection")):
        target = f"text_model.{target}"
    return KOHYA_COMPONENT_PREFIX[component] + target.replace(".", "_")


def save_kohya(path: Path, modules: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]],
               metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16,
               embeddings: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Save low-rank modules {(component, target): (down A, up B, alpha)} as `<name>.lora_down.weight`,
    `.lora_up.weight` and `.alpha` (scale = alpha / rank), and words {word: {text encoder: vectors (n, width)}}
    as kohya's bundled embeddings (`bundle_emb.<word>.string_to_param.*`; SDXL `.clip_l` / `.clip_g`), in fp32."""
    from safetensors.torch import save_file

    state = {}
    for word, per_component in (embeddings or {}).items():
        sdxl = "text_encoder_2" in per_component
        for component, vectors in per_component.items():
            part = ("clip_l" if component == "text_encoder" else "clip_g") if sdxl else "string_to_param.*"
            state[f"bundle_emb.{word}.{part}"] = vectors.detach().float().contiguous()
    for (component, target), (down, up, alpha) in modules.items():
        name = kohya_module_name(component, target)
        state[f"{name}.lora_down.weight"] = down.detach().to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.detach().to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    ranks = {int(down.shape[0]) for down, _, _ in modules.values()}
    alphas = {float(alpha) for _, _, alpha in modules.values()}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": str(max(alphas))}
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return path
