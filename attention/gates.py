"""Region gates: the controller's `lora_gate` hung on every LoRA layer of a pipeline, so that each adapter's
delta is masked by its region (space) or its batch rows (one pass per LoRA batched into one call). Shared by
every method that routes LoRAs: regional, LoRA-Composer, CLoRA, composite."""
from __future__ import annotations

import functools

from attention.controller import CompositionController


def attach_gates(pipe, controller: CompositionController) -> list:
    """Gate every LoRA layer of `pipe` by `controller`; returns the layers for `detach_gates`."""
    from studio.lora.inject import lora_layers

    layers = list(lora_layers(pipe).values())
    for layer in layers:
        layer.gate = functools.partial(controller.lora_gate, layer.name)
    return layers


def detach_gates(layers) -> None:
    for layer in layers:
        layer.gate = None
