"""`studio generate`, `studio methods` and presets, in-process through typer's runner."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from studio.cli import app
from studio.spec import Composition, LoraEntry, Region, load_preset, save_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    return folder


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
    assert methods["clora"]["params"]["mask_threshold"]["default"] == 0.3
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


def test_batch_generates_presets_times_seeds_and_reports_failures(tiny_folder, tiny_loras, tmp_path):
    composition = Composition(base_model=str(tiny_folder), prompt="a large solid red sks on the left", steps=2,
                              method="regional",
                              loras=[LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"],
                                               region=Region(box=(0, 0, 0.5, 1)))])
    good = tmp_path / "good.json"
    save_preset(composition, good)
    missing = tmp_path / "missing.json"
    result = runner.invoke(app, ["batch", str(good), str(missing), "--seeds", "0-1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    records = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [(r["seed"], "error" in r) for r in records] == [(0, False), (1, False), (0, True), (1, True)]
    assert all(Image.open(r["image"]).size == (64, 64) for r in records[:2])
    assert "2 of 4 images written" in result.stdout and "missing.json" in result.output
    assert runner.invoke(app, ["batch", str(good), "--seeds", "x", "--out", str(tmp_path)]).exit_code == 2
