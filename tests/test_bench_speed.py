"""The speed benchmark runs end to end on the bundled model and its references compute our images where the maths is
the same; its timings live in bench/results, never in a test."""
import json
import runpy

import torch

from studio import paths


def test_a_speed_run_on_the_bundled_model_completes_and_its_references_agree(tmp_path):
    bench = runpy.run_path(str(paths.PROJECT_ROOT / "bench" / "speed.py"), run_name="bench")
    bench["main"](["--models", "shapes", "--ns", "2", "--steps", "3", "--no-startup", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {(r["method"], r["n"], r["way"]): r for r in report["rows"]}
    assert rows[("one_lora", 1, "ours")]["ratio"] == 1.0
    for method in ("merge", "regional", "lora_composer", "clora", "switch", "composite"):
        assert rows[(method, 2, "ours")]["s_per_step"] > 0 and rows[(method, 2, "ours")]["peak_mem_ratio"] >= 0
    for method in ("regional", "lora_composer", "clora", "composite"):
        assert (method, 2, "official") in rows
    assert {("k_lora", 2, "ours"), ("b4m", 2, "ours")} <= set(rows)
    assert "whole_generation_ratio" in rows[("clora", 2, "ours")]
    assert {("one_lora", 1, "diffusers"), ("merge", 2, "diffusers")} <= set(rows)  # the peer's floor
    assert {c["method"] for c in report["checks"]} == {"lora_composer", "clora", "composite"}
    assert all(c["same"] for c in report["checks"]), report["checks"]
    assert (tmp_path / "speed.md").read_text().startswith("# Speed and memory")
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_a_pass_until_some_layers_stops_there_with_their_maps_as_a_full_pass_records_them(tiny_pipe):
    from attention.controller import CompositionController
    from attention.processors import composer_layers, install_processors
    from attention.store import AttentionStore
    from studio.engine import encode, unet_pass, unet_pass_until

    unet = tiny_pipe.unet
    layers = set(composer_layers(unet))
    controller = CompositionController((8, 8))
    previous = install_processors(unet, controller)
    ran = []
    handle = unet.conv_out.register_forward_hook(lambda *_: ran.append("conv_out"))
    try:
        cond = encode(tiny_pipe, ["a red circle"], None, 64, 64)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500)
        full, early = AttentionStore(layers), AttentionStore(layers)
        with torch.no_grad(), controller.override(store=full):
            unet_pass(tiny_pipe, latents, t, cond)
        assert ran == ["conv_out"]
        with torch.no_grad(), controller.override(store=early):
            unet_pass_until(tiny_pipe, latents, t, cond, layers)
        assert ran == ["conv_out"]  # the stopped pass never reached the output layer
        assert early.maps.keys() == full.maps.keys()
        assert all(torch.equal(early.maps[k], full.maps[k]) for k in full.maps)
        assert not any(h for m in unet.modules() for h in m._forward_hooks.values() if h is not None
                       and getattr(h, "__qualname__", "").startswith("unet_pass_until"))
    finally:
        handle.remove()
        unet.set_attn_processor(previous)
