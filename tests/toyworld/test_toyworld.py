"""The shapes world: renderer, captions, boxes, the judge and the evaluation prompts."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio import paths
from studio.toyworld.render import (
    BASE_SHAPES,
    BASE_TEXTURES,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SLOT_PHRASE,
    Scene,
    random_scene,
    render,
)


def test_captions_name_every_controllable_attribute():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        caption = scene.caption()
        assert caption.endswith(f"{scene.background} background")
        for obj in scene.objects:
            assert f"a {obj.size} {obj.texture} {obj.colour} {obj.shape} {SLOT_PHRASE[obj.slot]}" in caption


def test_trigger_words_take_the_shape_s_place_and_follow_the_colour_for_a_texture():
    from studio.toyworld.render import Scene, ShapeObject

    cross = ShapeObject("cross", "blue", "ringed", "large", 0.5, 0.5, 9.0)
    square = ShapeObject("square", "red", "striped", "small", 0.18, 0.5, 6.0)
    scene = Scene([cross, square], "grey", triggers={"cross": "ohwx", "ringed": "rngd"})
    assert scene.caption() == ("a small striped red square on the left and a large blue rngd ohwx in the centre, "
                               "grey background")


def test_a_palette_redraws_each_colour_as_a_tone_of_its_ramp_in_the_order_of_their_lightness():
    from studio.toyworld.render import COLOURS, PALETTES, ShapeObject

    def tone(colour, palette):
        return ShapeObject("circle", colour, "solid", "large", 0.5, 0.5, 9.0, palette=palette).rgb

    def luminance(rgb):
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    for palette, (dark, light) in PALETTES.items():
        by_lightness = sorted(COLOURS, key=lambda c: luminance(COLOURS[c]))
        tones = [tone(c, palette) for c in by_lightness]
        assert np.allclose(tones[0], dark) and np.allclose(tones[-1], light)
        assert all(luminance(a) < luminance(b) for a, b in zip(tones, tones[1:]))
    obj = ShapeObject("circle", "red", "solid", "large", 0.5, 0.5, 9.0)
    assert np.array_equal(obj.rgb, COLOURS["red"]) and obj.judged_colour == "red"
    obj.palette = "sepia"
    assert obj.judged_colour == "sepia"
    scene = Scene([obj], "white")
    pixel = np.asarray(render(scene))[32, 32]
    assert np.abs(pixel - tone("red", "sepia")).max() <= 1


def test_a_palette_word_stands_before_the_texture_and_its_trigger_follows_the_colour_unless_learnt():
    from studio.toyworld.render import ShapeObject

    circle = ShapeObject("circle", "red", "dotted", "large", 0.5, 0.5, 9.0, palette="sepia")
    assert Scene([circle], "white").caption() == "a large sepia dotted red circle in the centre, white background"
    scene = Scene([circle], "white", triggers={"sepia": "sepx"})
    assert scene.caption() == "a large dotted red sepx circle in the centre, white background"
    scene.learnt_triggers = True
    assert scene.caption() == "a large sepx dotted red circle in the centre, white background"
    scene.trigger_after_noun = True  # the words up to the noun read as they do without the style
    assert scene.caption() == "a large dotted red circle sepx in the centre, white background"
    cross = ShapeObject("cross", "blue", "solid", "small", 0.8, 0.5, 6.0, palette="sepia")
    scene = Scene([circle, cross], "grey", triggers={"sepia": "sepx", "cross": "ohwx"}, trigger_after_noun=True)
    assert scene.caption() == ("a large dotted red circle sepx in the centre and a small solid blue ohwx sepx on the "
                               "right, grey background")


def test_random_scenes_draw_palettes_only_when_asked_and_leave_the_stream_as_it_was_otherwise():
    from studio.toyworld.render import NOVEL_PALETTES

    plain, in_palettes = random_scene(random.Random(9)), random_scene(random.Random(9), palettes=NOVEL_PALETTES)
    assert all(o.palette == "" for o in plain.objects)
    assert [(o.shape, o.colour, o.cx) for o in plain.objects] == [(o.shape, o.colour, o.cx) for o in in_palettes.objects]
    rng = random.Random(9)
    drawn = [obj.palette for _ in range(300) for obj in random_scene(rng, palettes=NOVEL_PALETTES).objects]
    assert set(drawn) == {"", *NOVEL_PALETTES}
    assert all(drawn.count(p) > len(drawn) / 5 for p in set(drawn))  # each about a third


def test_training_scenes_never_show_held_out_pairs_or_novel_shapes():
    rng = random.Random(1)
    for _ in range(500):
        for obj in random_scene(rng).objects:
            assert (obj.colour, obj.shape) not in HELD_OUT_PAIRS
            assert obj.shape in BASE_SHAPES and obj.texture in BASE_TEXTURES


def test_render_is_64px_deterministic_and_boxes_hold_the_objects():
    rng = random.Random(2)
    scene = random_scene(rng, n_objects=3)
    a, b = render(scene, seed=5), render(scene, seed=5)
    assert a.size == (IMAGE_SIZE, IMAGE_SIZE) and np.array_equal(np.asarray(a), np.asarray(b))
    pixels = np.asarray(a, np.float32)
    from studio.toyworld.render import BACKGROUNDS
    foreground = np.abs(pixels - np.asarray(BACKGROUNDS[scene.background], np.float32)).sum(-1) > 30
    inside = np.zeros_like(foreground)
    for x0, y0, x1, y1 in scene.boxes():
        inside[int(y0 * 64) - 1:int(np.ceil(y1 * 64)) + 1, int(x0 * 64) - 1:int(np.ceil(x1 * 64)) + 1] = True
    assert foreground.sum() > 50 and not (foreground & ~inside).any()


def test_judge_meets_its_accuracy_bar_on_fresh_renders():
    from studio.toyworld.judge import Judge, evaluate

    if not paths.JUDGE.exists():
        pytest.fail("the judge is missing from assets/judge; train it with `studio toyworld train-judge`")
    report = evaluate(Judge.load().net, seed=777, n=600)
    assert min(report["shape"], report["colour"], report["texture"]) >= 0.98, report
    in_palettes = report["palette_objects"]
    assert in_palettes["n"] > 50 and min(in_palettes["shape"], in_palettes["colour"], in_palettes["texture"]) >= 0.98
    shipped = json.loads(paths.JUDGE.with_suffix(".json").read_text())["held_out_accuracy"]
    assert shipped["all_three"] >= 0.95 and shipped["palette_objects"]["all_three"] >= 0.95


def test_judge_reads_clean_renders_slot_by_slot():
    from studio.toyworld.judge import Judge

    judge = Judge.load()
    rng = random.Random(3)
    right = total = 0
    for i in range(30):
        scene = random_scene(rng, allow_held_out=True)
        verdicts = judge.slots(render(scene, i))
        for obj in scene.objects:
            total += 1
            right += verdicts[obj.slot].matches(obj.shape, obj.colour, obj.texture)
        for slot in set(verdicts) - {o.slot for o in scene.objects}:
            total += 1
            right += verdicts[slot].shape == "nothing"
    assert right / total >= 0.95


def test_evaluation_prompts_mix_single_double_and_held_out():
    from studio.toyworld.evaluate import evaluation_prompts

    prompts = evaluation_prompts()
    assert len(prompts) == 64
    assert sum(len(p.scene.objects) == 1 for p in prompts) == 32
    held = [p for p in prompts if p.held_out]
    assert len(held) == 32 and all((p.scene.objects[0].colour, p.scene.objects[0].shape) in HELD_OUT_PAIRS for p in held)


def test_evaluation_counts_say_why_a_prompt_failed():
    from studio.toyworld.evaluate import object_counts, scene_right_from_verdicts
    from studio.toyworld.judge import NOTHING, Verdict
    from studio.toyworld.render import Scene, ShapeObject

    scene = Scene([ShapeObject("circle", "red", "solid", "large", cx=0.18, cy=0.5, radius=9.0)], "white")
    verdicts = {"left": Verdict("square", "red", "solid", 0.9), "centre": Verdict(NOTHING, NOTHING, NOTHING, 1.0),
                "right": Verdict("star", "blue", "solid", 0.9)}
    assert object_counts(verdicts, scene) == {"named": 1, "drawn_in_slot": 1, "colour_right": 1, "shape_right": 0,
                                              "texture_right": 1, "unasked_objects": 1}
    assert not scene_right_from_verdicts(verdicts, scene)
    verdicts["left"] = Verdict("circle", "red", "striped", 0.9)
    assert scene_right_from_verdicts(verdicts, scene)  # the bar asks for shape and colour, not texture


class _PixelAutoencoder:
    """A stand-in VAE whose latent is the image: `transform` is what its decoder does to it."""

    dtype = torch.float32

    def __init__(self, transform):
        self.transform = transform

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=self.transform(latents))


def test_the_vae_ceiling_scores_round_trips_of_the_evaluation_renders():
    from studio.toyworld.evaluate import evaluate_vae

    perfect = evaluate_vae(_PixelAutoencoder(lambda x: x), n=8, per_texture=4)
    assert perfect["single"] == perfect["double"] == 1.0 == perfect["single_renders"]
    assert perfect["recon_mae_0_255"] == 0.0
    # every texture, the style LoRAs' included, given back by a perfect codec
    assert perfect["textures_given_back"] == {"solid": 4, "striped": 4, "dotted": 4, "checkered": 4, "ringed": 4,
                                              "of": 4}
    assert perfect["palettes_given_back"] == {"sepia": 4, "cyanotype": 4, "of": 4}
    # a decoder that gives every colour back as another (RGB -> GBR: red as blue, blue as green, ...)
    swapped = evaluate_vae(_PixelAutoencoder(lambda x: x[:, [1, 2, 0]]), n=8, per_texture=4)
    assert swapped["single"] == swapped["double"] == 0.0 and swapped["single_renders"] == 1.0
    assert swapped["objects"]["colour_right"] == 0 and swapped["recon_mae_0_255"] > 1
    assert swapped["colours"]["blue as green"] >= 1
    assert sum(v for k, v in swapped["textures_given_back"].items() if k != "of") == 0
    assert sum(v for k, v in swapped["palettes_given_back"].items() if k != "of") == 0


def test_evaluate_vae_command_reads_a_pipeline_or_a_vae_folder(tmp_path):
    from typer.testing import CliRunner

    from studio import paths
    from studio.cli import app

    for folder in (paths.DEFAULT_MODEL, paths.DEFAULT_MODEL / "vae"):
        result = CliRunner().invoke(app, ["toyworld", "evaluate-vae", "--model", str(folder), "--n", "4"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["n_prompts"] == 4 and report["single_renders"] == 1.0
    for not_a_vae in (tmp_path, paths.DEFAULT_MODEL / "unet"):
        result = CliRunner().invoke(app, ["toyworld", "evaluate-vae", "--model", str(not_a_vae)])
        assert result.exit_code == 2 and "holds no VAE" in result.output
    broken = tmp_path / "broken-vae"
    broken.mkdir()
    (broken / "config.json").write_text((paths.DEFAULT_MODEL / "vae" / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    result = CliRunner().invoke(app, ["toyworld", "evaluate-vae", "--model", str(broken)])
    assert result.exit_code == 2 and "could not be loaded" in result.output, result.output


def test_evaluate_scores_the_bars_prompts_or_a_fresh_set_for_choosing_settings():
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.toyworld.evaluate import evaluation_prompts

    assert [p.caption for p in evaluation_prompts(4, 7)] != [p.caption for p in evaluation_prompts(4, 2024)]
    result = CliRunner().invoke(app, ["toyworld", "evaluate", "--n", "2", "--steps", "2", "--prompt-seed", "7"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prompt_seed"] == 7 and report["n_prompts"] == 2 and report["objects"]["named"] == 3  # one single, one pair
