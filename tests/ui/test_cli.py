"""`studio generate`, `studio methods` and presets, in-process through typer's runner."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from studio.cli import app
from studio.spec import Composition, LoraEntry, Region, load_preset, save_preset

runner = CliRunner()


def two_concepts_preset(model_folder, loras, folder):
    composition = Composition(
        base_model=str(model_folder), prompt="a large solid red sks on the left and a blue ohwx on the right",
        steps=2, seed=3, method="regional",
        loras=[LoraEntry(file=str(loras["alpha"]), trigger_words=["sks"], region=Region(box=(0, 0, 0.5, 1))),
               LoraEntry(file=str(loras["beta"]), trigger_words=["ohwx"], region=Region(box=(0.5, 0, 1, 1)))])
    preset = folder / "two.json"
    save_preset(composition, preset)
    return preset


def test_methods_lists_every_method_with_parameters_and_passes():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    assert {"regional", "lora_composer", "clora", "merge", "switch", "composite", "b4m", "k_lora"} <= set(methods)
    assert methods["lora_composer"]["params"]["step_size"]["default"] == 20.0
    assert methods["clora"]["params"]["mask_threshold"]["default"] == 0.1
    assert methods["switch"]["params"]["switch_step"]["default"] == 5
    assert all(m["summary"] and m["unet_passes_per_step"] for m in methods.values())
    text = runner.invoke(app, ["methods"]).stdout
    assert "UNet passes per step" in text


def test_generate_writes_image_maps_and_masks_and_the_png_restores_the_preset(tiny_folder, tiny_loras, tmp_path):
    preset = two_concepts_preset(tiny_folder, tiny_loras, tmp_path)
    result = runner.invoke(app, ["generate", str(preset), "--out", str(tmp_path / "out"), "--method", "lora_composer",
                                 "--seed", "5"])
    assert result.exit_code == 0, result.output
    written = [p for p in result.stdout.split() if p.endswith(".png")]
    assert len(written) == 5  # image + 2 maps + 2 masks
    image = Image.open(written[0])
    assert image.size == (64, 64)
    assert "Steps: 2" in image.text["parameters"] and "Lora hashes" in image.text["parameters"]
    restored = load_preset(written[0])
    assert restored.method == "lora_composer" and restored.seed == 5 and len(restored.loras) == 2


def test_generate_overview_outlines_each_region_and_lays_each_map_over_the_image(tiny_folder, tiny_loras, tmp_path):
    preset = two_concepts_preset(tiny_folder, tiny_loras, tmp_path)
    result = runner.invoke(app, ["generate", str(preset), "--out", str(tmp_path / "out"), "--overview"])
    assert result.exit_code == 0, result.output
    overview = Image.open(next(p for p in result.stdout.split() if p.endswith("-overview.png"))).convert("RGB")
    assert overview.size == (3 * 256 + 2 * 8, 256)  # the image and one panel per concept, 4× larger
    first_column = [overview.getpixel((0, y)) for y in range(256)]
    assert (230, 60, 60) in first_column  # the first concept's box, outlined in its colour


def test_generate_refuses_a_bad_preset_in_one_sentence(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "x", "steps": 0}))
    result = runner.invoke(app, ["generate", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "field `steps`" in result.output and result.output.count("\n") == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = runner.invoke(app, ["generate", str(broken), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"prompt": "x", "method": "nope"}))
    result = runner.invoke(app, ["generate", str(unknown), "--out", str(tmp_path), "--model", "/nonexistent"])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_region_validation_names_the_field():
    from studio.errors import PresetError
    from studio.spec import parse_composition

    with pytest.raises(PresetError, match=r"field `loras.0.region`"):
        parse_composition({"prompt": "x", "loras": [{"file": "a", "region": {"box": [0.5, 0, 0.2, 1]}}]})


def test_generate_without_a_preset_from_a_prompt_and_lora_options(tiny_folder, tiny_loras, tmp_path):
    keep = tmp_path / "kept.json"
    result = runner.invoke(app, ["generate", "--prompt", "a red sks on the left and a blue ohwx on the right",
                                 "--lora", f"{tiny_loras['alpha']}:0.8@0,0,0.5,1",
                                 "--lora", f"{tiny_loras['beta']}@0.5,0,1,1", "--seeds", "1-2", "--size", "64x48",
                                 "--steps", "2", "--sampler", "DPM++ 2M Karras", "--model", str(tiny_folder),
                                 "--out", str(tmp_path / "out"), "--save-preset", str(keep)])
    assert result.exit_code == 0, result.output
    images = [p for p in result.stdout.split() if p.endswith(("-1.png", "-2.png"))]
    assert [p.rsplit("/", 1)[-1] for p in images] == ["image-regional-1.png", "image-regional-2.png"]
    assert Image.open(images[0]).size == (64, 48)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in Image.open(images[0]).text["parameters"]
    kept = load_preset(keep)
    assert kept.method == "regional" and kept.loras[0].weight == 0.8 and kept.loras[1].region.box == (0.5, 0, 1, 1)
    assert kept.scheduler == "DPM++ 2M Karras" and (kept.width, kept.height) == (64, 48)
    bad = runner.invoke(app, ["generate", "--prompt", "x", "--lora", "a.safetensors@1,2", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "four numbers" in bad.output
    assert runner.invoke(app, ["generate", "--out", str(tmp_path)]).exit_code == 2
