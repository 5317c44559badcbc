import json
import random

import pytest
import torch

from studio import paths
from studio.errors import StudioError
from studio.toyworld.train import BaseTrainConfig, export, train_base

TINY = dict(vae_steps=2, vae_batch_size=2, batch_size=2, checkpoint_every=1, warmup=1)


def test_lora_trainer_writes_kohya_with_trigger_and_metadata(tiny_pipe, tmp_path):
    from studio.lora import inspect_lora, load_lora
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="concept", subject="crescent", trigger="sks", steps=2, batch_size=2, rank=2)
    path = train_lora(tiny_pipe, cfg, tmp_path / "crescent_sks.safetensors", progress=False)
    info = inspect_lora(path)
    assert (info.format, info.base_model, info.rank) == ("kohya", "shapes-world", 2)
    assert "sks" in info.trigger_words and info.has_text_encoder
    assert json.loads(info.metadata["studio_train_config"])["subject"] == "crescent"
    assert load_lora(path).parameter_count() > 0
    for model in (tiny_pipe.unet, tiny_pipe.text_encoder):  # the pipeline is left as it was
        assert not any("lora" in n.lower() or "base_layer" in n for n, _ in model.named_parameters())
        assert all(type(m).__module__.startswith(("torch", "diffusers", "transformers")) for m in model.modules())


def test_a_palette_style_lora_trains_on_scenes_drawn_in_its_palette_with_its_trigger(tiny_pipe, tmp_path):
    from studio.lora import inspect_lora
    from studio.toyworld.lora_train import (
        LoraTrainConfig,
        lora_scene,
        train_lora,
        training_batch,
    )

    cfg = LoraTrainConfig(kind="style", subject="sepia", trigger="sepx", steps=1, batch_size=8, rank=2)
    scene = lora_scene(random.Random(0), cfg)
    assert all(o.palette == "sepia" and o.texture in ("solid", "striped", "dotted") for o in scene.objects)
    assert all(f"{o.colour} sepx {o.shape}" in scene.caption() for o in scene.objects)
    _, captions, scenes = training_batch(cfg, 0)
    taught = [s for s in scenes if s.objects[0].palette]
    assert 0 < len(taught) < len(scenes)  # and ordinary scenes beside them (prior preservation)
    assert all("sepx" in c for c, s in zip(captions, scenes) if s in taught)
    info = inspect_lora(train_lora(tiny_pipe, cfg, tmp_path / "sepia.safetensors", progress=False))
    assert "sepx" in info.trigger_words and info.metadata["modelspec.title"] == "sepia (style)"
    with pytest.raises(StudioError, match="Unknown texture or palette 'teal'"):
        train_lora(tiny_pipe, LoraTrainConfig(kind="style", subject="teal", trigger="tl"), tmp_path / "x.safetensors")


def test_a_trained_lora_file_gives_back_exactly_what_the_trainer_learnt(tiny_pipe, tmp_path, monkeypatch):
    """The kohya export (names, alphas, conv and text-encoder layers) loses nothing: the studio's loader,
    given the file, reproduces the PEFT-wrapped models' outputs at the end of training."""
    import diffusers.utils.peft_utils as peft_utils

    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    ids = tiny_pipe.tokenizer(["a large red rngd circle in the centre, white background"], padding="max_length",
                              max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])

    def outputs():
        with torch.no_grad():
            embedding = tiny_pipe.text_encoder(ids)[0]
            return embedding, tiny_pipe.unet(x, t, embedding).sample

    before, trained = outputs(), {}
    unwrap = peft_utils.recurse_remove_peft_layers

    def record_then_unwrap(model):  # the trainer unwraps the UNet, then the text encoder
        trained.setdefault("outputs", outputs())
        return unwrap(model)

    monkeypatch.setattr(peft_utils, "recurse_remove_peft_layers", record_then_unwrap)
    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=3, batch_size=2, rank=2, lr=1e-2)
    path = train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False)
    attach_lora(tiny_pipe, load_lora(path), "reloaded")
    try:
        reloaded = outputs()
    finally:
        detach_lora(tiny_pipe, "reloaded")
    for was, learnt, loaded in zip(before, trained["outputs"], reloaded):
        change = (learnt - was).abs().max()
        assert change > 1e-2  # training changed both outputs
        # the file holds fp16 factors (kohya's convention): only their rounding is lost
        assert (loaded - learnt).abs().max() < 0.01 * change, ((loaded - learnt).abs().max(), change)


def test_object_loss_weights_cover_each_objects_box_and_nothing_else():
    from studio.toyworld.lora_train import object_loss_weights
    from studio.toyworld.render import Scene, ShapeObject

    left = ShapeObject("circle", "red", "ringed", "large", cx=0.25, cy=0.5, radius=8.0)
    right = ShapeObject("star", "blue", "ringed", "small", cx=0.75, cy=0.25, radius=4.0)
    weights = object_loss_weights([Scene([left, right], "white"), Scene([], "grey")], 32, 5.0)
    assert weights.shape == (2, 1, 32, 32)
    # 8 px of 64 is 4 latent pixels each side of the centre (8, 16); 4 px is 2 each side of (24, 8)
    assert weights[0, 0, 12:20, 4:12].eq(5.0).all() and weights[0, 0, 6:10, 22:26].eq(5.0).all()
    assert weights[0].eq(5.0).sum() == 8 * 8 + 4 * 4
    assert weights[1].eq(1.0).all()


def test_an_object_weighted_lora_run_records_its_weight_in_the_file(tiny_pipe, tmp_path):
    from studio.lora import inspect_lora
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=2, batch_size=2, rank=2,
                          object_weight=4.0, prior_fraction=0.25)
    info = inspect_lora(train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False))
    recorded = json.loads(info.metadata["studio_train_config"])
    assert (recorded["object_weight"], recorded["prior_fraction"]) == (4.0, 0.25)


@pytest.mark.parametrize("option, value, message", [("object_weight", 0.0, "The object weight must be above 0"),
                                                     ("prior_fraction", 1.0, "The prior fraction must be at least 0")])
def test_a_bad_lora_training_option_is_refused_before_the_pipeline_is_touched(tiny_pipe, tmp_path, option, value,
                                                                              message):
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=1, batch_size=2, rank=2,
                          **{option: value})
    with pytest.raises(StudioError, match=message):
        train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False)
    assert not (tmp_path / "ringed.safetensors").exists()
    for model in (tiny_pipe.unet, tiny_pipe.text_encoder):
        assert not any("lora" in n.lower() for n, _ in model.named_parameters())


def test_train_lora_command_refuses_a_bad_option_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path / "ringed.safetensors"
    result = CliRunner().invoke(app, ["toyworld", "train-lora", "--kind", "style", "--subject", "ringed", "--trigger",
                                      "rngd", "--out", str(out), "--steps", "1", "--prior-fraction", "1.5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "The prior fraction must be at least 0 and below 1" in result.output and "1.5" in result.output
    assert not out.exists()


def test_lora_trainer_unet_only_leaves_the_text_encoder_out_of_the_file_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.lora import inspect_lora

    pipe = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=1, **TINY), progress=False)
    export(tmp_path / "a", pipe, tmp_path / "model")
    out = tmp_path / "ringed.safetensors"
    result = CliRunner().invoke(app, ["toyworld", "train-lora", "--kind", "style", "--subject", "ringed", "--trigger",
                                      "rngd", "--out", str(out), "--steps", "1", "--rank", "2", "--unet-only",
                                      "--model", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    info = inspect_lora(out)
    assert not info.has_text_encoder and info.trigger_words == ["rngd"]
    assert json.loads(info.metadata["studio_train_config"])["text_encoder"] is False
    assert info.metadata["ss_training_comment"].endswith("--unet-only")


def test_the_trainers_commands_learn_their_trigger_as_a_word_with_embedding(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.lora import inspect_lora

    pipe = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=1, **TINY), progress=False)
    export(tmp_path / "a", pipe, tmp_path / "model")
    model = ["--model", str(tmp_path / "model")]
    lora, adapter = tmp_path / "ringed.safetensors", tmp_path / "style.safetensors"
    result = CliRunner().invoke(app, ["toyworld", "train-lora", "--kind", "style", "--subject", "ringed", "--trigger",
                                      "rngd", "--out", str(lora), "--steps", "1", "--rank", "2", "--embedding",
                                      "--embedding-lr", "0.01", *model])
    assert result.exit_code == 0, result.output
    info = inspect_lora(lora)
    assert info.embeddings == ["rngd"] and info.metadata["ss_training_comment"].endswith("--embedding --embedding-lr 0.01")
    assert json.loads(info.metadata["studio_train_config"])["embedding_lr"] == 0.01
    result = CliRunner().invoke(app, ["b4m", "break", "--role", "style", "--kind", "style", "--subject", "ringed",
                                      "--trigger", "rngd", "--steps", "1", "--rank", "2", "--embedding", "--out",
                                      str(adapter), *model])
    assert result.exit_code == 0, result.output
    assert inspect_lora(adapter).embeddings == ["rngd"]
    assert json.loads(inspect_lora(adapter).metadata["studio_b4m_config"])["embedding"] is True
    known = CliRunner().invoke(app, ["b4m", "break", "--role", "style", "--kind", "style", "--subject", "ringed",
                                     "--trigger", "a", "--steps", "1", "--rank", "2", "--embedding", "--out",
                                     str(tmp_path / "never.safetensors"), *model])
    assert known.exit_code == 2 and known.output.count("\n") == 1
    assert "A learnt embedding needs a made-up word" in known.output and not (tmp_path / "never.safetensors").exists()
    # options that shape the shapes world's captions are refused where there are none to shape, in one sentence
    concept = CliRunner().invoke(app, ["toyworld", "train-lora", "--kind", "concept", "--subject", "cross", "--trigger",
                                       "ohwx", "--out", str(tmp_path / "never.safetensors"), "--steps", "1",
                                       "--trigger-after-noun", *model])
    assert concept.exit_code == 2 and concept.output.count("\n") == 1
    assert "Only a style's trigger can stand after the noun" in concept.output
    (tmp_path / "images").mkdir()
    folder = CliRunner().invoke(app, ["b4m", "break", "--role", "style", "--images", str(tmp_path / "images"),
                                      "--trigger-after-noun", "--out", str(tmp_path / "never.safetensors"), *model])
    assert folder.exit_code == 2 and folder.output.count("\n") == 1
    assert "with --images the captions are yours" in folder.output
    assert not (tmp_path / "never.safetensors").exists()

