"""Region gates: the controller's `lora_gate` hung on every LoRA layer of a pipeline, so that each adapter's
delta is masked by its region (space) or its batch rows (one pass per LoRA batched into one call). Shared by
every method that routes LoRAs: regional, LoRA-Composer, CLoRA, composite."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from attention.controller import CompositionController


@contextlib.contextmanager
def region_gates(pipe, controller: CompositionController) -> Iterator[list]:
    """Every LoRA layer of `pipe` gated by `controller` inside the block; ungated on exit, whatever happens."""
    layers = attach_gates(pipe, controller)
    try:
        yield layers
    finally:
        detach_gates(layers)


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
