"""The bundled examples: the six shapes-world LoRAs, the B4M pair and the presets that compose them,
run with every method through `studio generate` on the bundled model."""
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from studio import paths
from studio.cli import app
from studio.spec import load_preset

runner = CliRunner()
EXAMPLE_LORAS = {  # file -> (kind, subject, trigger)
    "crescent-sks": ("concept", "crescent", "sks"),
    "cross-ohwx": ("concept", "cross", "ohwx"),
    "checkered-chkrd": ("style", "checkered", "chkrd"),
    "ringed-rngd": ("style", "ringed", "rngd"),
    "sepia-sepx": ("style", "sepia", "sepx"),
    "cyanotype-cynx": ("style", "cyanotype", "cynx"),
}
PRESETS = ("two-concepts", "concept-and-style", "b4m-pair", "b4m-made")


@pytest.mark.parametrize("stem", sorted(EXAMPLE_LORAS))
def test_example_lora_is_a_small_kohya_file_with_its_trigger_and_command(stem, shapes_pipe):
    from studio.lora import inspect_lora, load_lora
    from studio.lora.inject import attach_lora, detach_lora

    kind, subject, trigger = EXAMPLE_LORAS[stem]
    path = paths.EXAMPLE_LORAS / f"{stem}.safetensors"
    assert path.stat().st_size <= 2_000_000
    info = inspect_lora(path)
    assert info.format == "kohya" and info.base_model == "shapes-world"
    assert info.trigger_words == [trigger]
    config = json.loads(info.metadata["studio_train_config"])
    assert (config["kind"], config["subject"], config["trigger"]) == (kind, subject, trigger)
    assert info.metadata["ss_training_comment"].startswith(f"studio toyworld train-lora --kind {kind} "
                                                            f"--subject {subject} --trigger {trigger}")
    assert attach_lora(shapes_pipe, load_lora(path), "example") > 0
    detach_lora(shapes_pipe, "example")
    evaluation = json.loads((paths.EXAMPLE_LORAS / f"{stem}.evaluation.json").read_text())
    assert evaluation["subject"] == subject and 0.0 <= evaluation["taught_right"] <= 1.0


@pytest.mark.parametrize("stem", PRESETS)
def test_example_preset_validates_and_its_files_exist(stem):
    composition = load_preset(paths.EXAMPLE_PRESETS / f"{stem}.json")
    assert composition.base_model is None  # the bundled model
    assert len(composition.loras) == (1 if stem == "b4m-made" else 2)  # a made B4M adapter is one LoRA
    for entry in composition.loras:
        assert entry.trigger_words and all(word in composition.prompt for word in entry.trigger_words)
        assert Path(entry.file).is_file()  # named relative to the preset, resolved when loading


def _generate(preset, out, method=None):
    args = ["generate", str(paths.EXAMPLE_PRESETS / f"{preset}.json"), "--out", str(out)]
    result = runner.invoke(app, args + (["--method", method] if method else []))
    assert result.exit_code == 0, result.output
    return [p for p in result.stdout.split() if p.endswith(".png")]


# Methods that draw each concept in its own place return a map and a mask per concept; the baselines
# (one prediction for the whole image) return the image only.
@pytest.mark.parametrize("method, per_concept_pngs", [("regional", 4), ("lora_composer", 4), ("clora", 4),
                                                       ("merge", 0), ("switch", 0), ("composite", 0)])
def test_studio_generate_runs_every_method_on_the_bundled_model_with_two_concepts(method, per_concept_pngs, tmp_path):
    written = _generate("two-concepts", tmp_path, method)
    assert len(written) == 1 + per_concept_pngs
    image = Image.open(written[0])
    assert image.size == (64, 64) and image.text["lora-studio"]
    assert load_preset(written[0]).method == method
    for png in written[1:]:
        assert Image.open(png).size == (64, 64)


def test_studio_generate_runs_the_concept_and_style_and_b4m_presets(tmp_path):
    assert len(_generate("concept-and-style", tmp_path / "style")) >= 1
    for preset in ("b4m-pair", "b4m-made"):
        written = _generate(preset, tmp_path / preset)
        assert load_preset(written[0]).method == "b4m"


def test_lora_evaluation_says_why_taught_prompts_fail(shapes_pipe):
    from studio.toyworld.evaluate import evaluate_lora

    report = evaluate_lora(shapes_pipe, paths.EXAMPLE_LORAS / "ringed-rngd.safetensors", n=3, steps=2)
    objects = report["objects"]
    assert report["kind"] == "style" and report["n"] == 3
    assert round(report["taught_right"] * 3) <= objects["taught"] <= objects["drawn_in_slot"] <= 3
    assert objects["colour_right"] <= objects["drawn_in_slot"]
    # every drawn object without the taught texture is named by what the judge saw instead
    assert sum(objects["drawn_instead"].values()) == objects["drawn_in_slot"] - objects["taught"]
    assert "ringed" not in objects["drawn_instead"]


def test_b4m_evaluation_scores_the_pair_assembled_and_alone(shapes_pipe):
    from studio.toyworld.evaluate import evaluate_b4m

    report = evaluate_b4m(shapes_pipe, paths.EXAMPLE_B4M / "cross-content.safetensors",
                          paths.EXAMPLE_B4M / "sepia-style.safetensors", n=1, steps=2)
    assert report["content"] == "cross (ohwx)" and report["style"] == "sepia (sepx)" and report["seed"] == 6072
    assert "ohwx" in report["example_prompt"] and "sepx" in report["example_prompt"]
    for label in ("assembled", "style_alone"):
        assert set(report[label]) == {"shape_right", "style_right", "content_in_style"}
    assert set(report["content_alone"]) == {"shape_right", "style_right", "content_in_style",
                                            "shape_right_without_style_word"}


def test_b4m_evaluate_refuses_an_ordinary_lora_in_one_sentence():
    result = runner.invoke(app, ["b4m", "evaluate", str(paths.EXAMPLE_LORAS / "crescent-sks.safetensors"),
                                 str(paths.EXAMPLE_B4M / "sepia-style.safetensors")])
    assert result.exit_code == 2
    assert "crescent-sks.safetensors is not a shapes-world B4M adapter" in result.output
    assert result.output.count("\n") == 1


def test_b4m_evaluation_scores_a_made_file_as_the_assembled_adapter_and_refuses_one_that_is_not(shapes_pipe):
    from studio.errors import LoraError
    from studio.toyworld.evaluate import evaluate_b4m

    content, style = paths.EXAMPLE_B4M / "cross-content.safetensors", paths.EXAMPLE_B4M / "sepia-style.safetensors"
    made = paths.EXAMPLE_B4M / "cross-sepia-assembled.safetensors"
    report = evaluate_b4m(shapes_pipe, content, style, n=1, steps=2, assembled_path=made)
    assert report["assembled_from"] == str(made)
    assert set(report["assembled"]) == {"shape_right", "style_right", "content_in_style"}
    with pytest.raises(LoraError, match="cross-content.safetensors is not an assembled B4M adapter"):
        evaluate_b4m(shapes_pipe, content, style, n=1, steps=2, assembled_path=content)
