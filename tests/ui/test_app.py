"""The web studio starts on 127.0.0.1 and composes through its own handlers."""
import urllib.request

import pytest


@pytest.fixture(scope="module")
def running_app(tiny_pipe, tmp_path_factory):
    from studio import webapp

    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    demo = webapp.main(host="127.0.0.1", port=7871, model=str(folder), prevent_thread_lock=True)
    demo.model_folder = folder
    yield demo
    demo.close()


def test_studio_serves_its_page_on_localhost(running_app):
    with urllib.request.urlopen("http://127.0.0.1:7871/", timeout=30) as response:
        assert response.status == 200
        assert "LoRA Studio" in response.read().decode()


def test_the_model_panel_swaps_the_model_and_a_model_that_cannot_load_leaves_the_current_one(running_app, tmp_path):
    from studio.errors import StudioError

    state = running_app.studio_state
    before = state.pipe
    with pytest.raises(StudioError, match=r"^The model .*nowhere could not be loaded: .*the previous model stays loaded\.$"):
        state.load_model(str(tmp_path / "nowhere"))
    assert state.pipe is before and state.studio.pipe is before and not state.lock.locked()
    state.load_model(None)  # the bundled model
    assert state.model_ref is None and state.family == "shapes-world" and state.pipe is not before
    assert state.timing.seconds_per_pass_pixel is not None  # timed at load: the page can tell a run's time
    state.load_model(str(running_app.model_folder))
    assert state.model_ref == str(running_app.model_folder)


def test_a_lora_card_warns_in_one_sentence_when_the_lora_does_not_fit_the_model():
    from types import SimpleNamespace

    from studio.web_state import fit_warning, lora_card

    sdxl = SimpleNamespace(base_model="sdxl", trigger_words=["ohwx"], format="kohya", rank=16, short_hash="abc")
    card = lora_card("/loras/person.safetensors", sdxl, 0, "shapes-world")
    assert card["warning"] == "person.safetensors is a LoRA for sdxl, not for the loaded shapes-world model."
    assert card["trigger_words"] == ["ohwx"] and card["short_hash"] == "abc"
    assert fit_warning(SimpleNamespace(base_model="unknown"), "sd1", "x.safetensors") == ""
    assert fit_warning(None, "sd1", "gone.safetensors") == "gone.safetensors is not in the library."


def test_every_methods_parameters_become_form_controls_from_its_schema():
    import gradio as gr

    from composers import registry
    from studio import webapp

    with gr.Blocks():
        for method in registry():
            for field in webapp.param_fields(method):
                assert field["kind"] in ("choice", "checkbox", "slider", "number", "integer", "list", "text")
                webapp.param_control(field, None)  # builds with the default shown
    fields = {f["name"]: f for f in webapp.param_fields("clora")}
    assert fields["mask_threshold"]["kind"] == "slider" and (fields["mask_threshold"]["minimum"],
                                                             fields["mask_threshold"]["maximum"]) == (0, 1)
    assert fields["inner_steps"]["kind"] == "list" and fields["inner_steps"]["default"] == [0, 10, 20]
    assert fields["max_iter"]["kind"] == "integer" and fields["max_iter"]["info"]
    assert {f["name"]: f for f in webapp.param_fields("regional")}["regional_layers"]["choices"] == [
        "all", "cross_attention"]
    assert {f["name"]: f for f in webapp.param_fields("composite")}["text_encoding"]["choices"] == [
        "per_lora", "official"]
    beta = {f["name"]: f for f in webapp.param_fields("k_lora")}["beta"]
    assert beta["optional"] and beta["kind"] == "number"


def test_a_form_value_becomes_the_parameters_value_or_one_sentence():
    from studio import webapp
    from studio.errors import StudioError

    fields = {f["name"]: f for f in webapp.param_fields("clora")}
    assert webapp.field_value(fields["inner_steps"], "0, 5,9") == [0, 5, 9]
    assert webapp.field_value(fields["max_iter"], 12.0) == 12 and webapp.field_value(fields["max_iter"], "") is None
    with pytest.raises(StudioError, match="inner_steps is a comma-separated list of integers"):
        webapp.field_value(fields["inner_steps"], "0, ten")


def test_the_cost_line_counts_unet_passes_and_times_them_on_this_device():
    from types import SimpleNamespace

    from studio import webapp
    from studio.web_state import Timing

    state = SimpleNamespace(timing=Timing(), pipe=SimpleNamespace(device=SimpleNamespace(type="cpu")))
    two = {"loras": [{}, {}], "params": {}, "params_method": "lora_composer"}
    line = webapp.cost_sentence(state, "lora_composer", two, 20, "64×64")
    assert "≈ 2.05 UNet passes per step" in line and "after the first run" in line  # 20 guided steps + re-init
    assert "≈ 3.00 UNet passes" in webapp.cost_sentence(state, "composite", {"loras": [{}] * 3}, 20, "64×64")
    placed_automatically = {"loras": [{"region": {"auto": True}}, {"region": {"box": [0, 0, 1, 1]}}]}
    assert "≈ 1.15 UNet passes" in webapp.cost_sentence(state, "regional", placed_automatically, 20, "64×64")  # 3 probes
    assert "≈ 1.00 UNet passes" in webapp.cost_sentence(state, "regional", two, 20, "64×64")
    assert "≈ 3.00 UNet passes" in webapp.cost_sentence(state, "latent_couple", two, 20, "64×64")
    state.timing.record(seconds_per_step=0.5, passes=1.0, pixels=64 * 64)
    assert "about 10.0 s for 20 steps" in webapp.cost_sentence(state, "regional", two, 20, "64×64")
    assert "about 40.0 s" in webapp.cost_sentence(state, "regional", two, 20, "128×128")  # 4× the pixels


def test_the_canvas_edits_become_the_drafts_regions(tmp_path):
    import base64
    import io

    from PIL import Image

    from studio.errors import StudioError
    from studio.web_state import apply_canvas, draft_composition

    def painted(white: bool) -> str:
        image = Image.new("L", (64, 64), 0)
        if white:
            image.paste(255, (10, 40, 50, 60))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    cards = [{"file": f"/l/{n}.safetensors", "name": n, "colour": "#000", "weight": 1.0, "role": "concept",
              "trigger_words": [n], "prompt": "", "region": {"box": [0, 0, 1, 1]}} for n in "abc"]
    draft = {"loras": cards, "params": {}}
    apply_canvas(draft, {"active": 2, "loras": [{"box": [0.1, 0.2, 0.5, 0.9], "mask": None},
                                                {"box": None, "mask": painted(False)},  # all erased
                                                {"box": None, "mask": painted(True)}]})
    assert draft["active"] == 2
    assert draft["loras"][0]["region"] == {"box": [0.1, 0.2, 0.5, 0.9]}
    assert draft["loras"][1]["region"] is None
    with pytest.raises(StudioError, match=r"^The painted mask is not a readable PNG image"):
        apply_canvas(draft, {"loras": [{"box": None, "mask": "data:image/png;base64,bm90IGEgcG5n"}]})
    composition = draft_composition(draft, {"prompt": "p", "width": 64, "height": 64})
    assert composition.loras[2].region.mask.startswith("data:image/png;base64,")
    assert composition.loras[0].trigger_words == ["a"]


def test_sizes_offered_are_the_familys_usual_ones_in_multiples_of_the_latent_factor():
    from studio.web_state import family_sizes, parse_size

    shapes = family_sizes("shapes-world", 64, 2)
    assert shapes[0] == "64×64" and "96×64" in shapes
    sdxl = family_sizes("sdxl", 1024, 8)
    assert sdxl[0] == "1024×1024" and "832×1216" in sdxl
    assert all(parse_size(s)[0] % 8 == 0 and parse_size(s)[1] % 8 == 0 for s in family_sizes("sd1", 512, 8))
    assert family_sizes("sd1", 512, 7) == []  # nothing that is not a multiple of the factor


def test_overlays_lay_each_concepts_map_and_mask_over_the_enlarged_result(tmp_path):
    import os
    from types import SimpleNamespace

    from PIL import Image

    from studio.web_state import StudioState, concept_layers, overlaid

    Image.new("RGB", (64, 64), "white").save(tmp_path / "r-regional-0.png")
    for name, x in (("l0_alpha", 0), ("l1_beta", 32)):
        layer = Image.new("L", (64, 64), 0)
        layer.paste(255, (x, 0, x + 32, 64))
        layer.save(tmp_path / f"r-regional-0-{name}-map.png")
        layer.save(tmp_path / f"r-regional-0-{name}-mask.png")
    assert list(concept_layers(tmp_path / "r-regional-0.png")) == ["l0_alpha", "l1_beta"]
    plain = overlaid(tmp_path / "r-regional-0.png", [], ["attention", "mask"])
    alpha = overlaid(tmp_path / "r-regional-0.png", ["1: alpha"], ["attention"])
    assert plain.size == (512, 512) and plain.getpixel((100, 256)) == (255, 255, 255)
    assert alpha.getpixel((100, 256))[0] > alpha.getpixel((100, 256))[2]  # alpha's red over its half
    assert alpha.getpixel((400, 256)) == (255, 255, 255)  # beta's half untouched: its overlay is off
    os.utime(tmp_path / "r-regional-0.png", (1, 1))
    Image.new("RGB", (64, 64)).save(tmp_path / "s-regional-1.png")
    assert [p.name for p in StudioState.history(SimpleNamespace(outputs=tmp_path))] == ["s-regional-1.png",
                                                                                       "r-regional-0.png"]


def test_studio_serve_starts_the_server_outside_the_checkout(tiny_pipe, tmp_path):
    """`make studio` runs the console script, whose import path is not the checkout's."""
    import subprocess
    import sys
    import time

    tiny_pipe.save_pretrained(tmp_path / "model")
    server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", "7873", "--model",
                               str(tmp_path / "model")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:7873/", timeout=5) as response:
                    assert "LoRA Studio" in response.read().decode()
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"the studio did not start: {server.stdout.read() if server.poll() is not None else ''}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_python_app_py_is_the_same_entry_point(tmp_path):
    import subprocess
    import sys

    from studio import paths

    result = subprocess.run([sys.executable, str(paths.PROJECT_ROOT / "app.py"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--port" in result.stdout, result.stderr


def test_a_mask_outline_is_the_band_along_its_edge():
    import numpy as np

    from studio.outputs import mask_outline

    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True  # a 5 × 5 square
    assert mask_outline(mask).sum() == 16 and not mask_outline(mask)[4, 4]
    assert mask_outline(mask, width=2).sum() == 24 and mask_outline(mask, width=2)[3, 3]
    assert not mask_outline(mask)[0, 0]
