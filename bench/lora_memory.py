"""Memory a LyCORIS LoKr file takes once attached: factored (as the studio applies it) against its
materialised ΔW (what a dense implementation holds), on the SD1.5-shaped pipeline.
Usage: studio bench lora_memory [FILE] (default: ../shared/fixtures/lora/lokr/smart_falcon_4_lokr.safetensors)"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None):
    from studio import paths
    from studio.architectures import random_sd15_pipeline
    from studio.lora import attach_lora, load_lora, lora_layers

    argv = argv or []
    path = Path(argv[0]) if argv else paths.PROJECT_ROOT.parent / "shared/fixtures/lora/lokr/smart_falcon_4_lokr.safetensors"
    if not path.exists():
        sys.exit(f"{path} does not exist")
    pipe = random_sd15_pipeline()
    attach_lora(pipe, load_lora(path), "bench")
    layers = lora_layers(pipe).values()
    factored = sum(t.numel() * t.element_size() for layer in layers for t in layer.adapters["bench"].tensors())
    dense = sum(layer.base.weight.numel() * 4 for layer in layers)
    print(f"{path.name}: {len(layers)} layers; attached factored {factored / 1e6:.1f} MB, "
          f"as dense ΔW {dense / 1e9:.2f} GB ({dense / factored:.0f}×)")


if __name__ == "__main__":
    main()
