"""The LoRA library: inspect LoRA files of every common format without loading them, convert them to
one representation (LoraWeights of LoraModules) and inject them with per-adapter weights, overrides
and region gates (LoraLayer)."""
from studio.lora.inject import (LoraLayer, attach_lora, attached_adapters, detach_lora, fit_to_layer, lora_layers,
                                only_adapters, set_lora_weights, text_encoder_layers)
from studio.lora.inspect import LoraInfo, inspect_lora
from studio.lora.library import LibraryEntry, library_folder, scan_library
from studio.lora.weights import LoraModule, LoraWeights, load_lora

__all__ = ["LoraInfo", "inspect_lora", "LoraModule", "LoraWeights", "load_lora", "LoraLayer", "attach_lora",
           "detach_lora", "set_lora_weights", "attached_adapters", "lora_layers", "text_encoder_layers",
           "only_adapters", "fit_to_layer", "LibraryEntry", "library_folder", "scan_library"]
