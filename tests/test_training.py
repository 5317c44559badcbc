"""`studio toyworld train` is seeded and resumable; the LoRA trainer writes kohya files with metadata."""
import json
import random
from dataclasses import replace

import pytest
import torch

from studio import paths
from studio.toyworld.train import BaseTrainConfig, export, train_base

TINY = dict(vae_steps=2, vae_batch_size=2, batch_size=2, checkpoint_every=1, warmup=1)


def test_resuming_continues_exactly_where_training_stopped(tmp_path):
    straight = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=3, **TINY), progress=False)
    train_base(tmp_path / "b", paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    resumed = train_base(tmp_path / "b", paths.TOKENIZER, BaseTrainConfig(steps=3, **TINY), progress=False)
    assert len((tmp_path / "b" / "loss.log").read_text().splitlines()) == 3  # steps 0, 1, then 2 only
    for (name, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_continues_from_an_exported_model(tmp_path):
    pipe = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    export(tmp_path / "a", pipe, tmp_path / "exported")
    record = json.loads((tmp_path / "exported" / "training.json").read_text())
    assert record["steps"] == 2
    train_base(tmp_path / "elsewhere", paths.TOKENIZER, BaseTrainConfig(steps=3, **TINY), progress=False,
               init_from=tmp_path / "exported")
    assert torch.load(tmp_path / "elsewhere" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert len((tmp_path / "elsewhere" / "loss.log").read_text().splitlines()) == 1
    # its fresh optimiser warms up again from the exported model's step, and a resumed run remembers that
    assert json.loads((tmp_path / "elsewhere" / "config.json").read_text())["warmup_start"] == 2
    # and an export of the continued run says what it was continued from
    export(tmp_path / "elsewhere", pipe, tmp_path / "exported-again")
    again = json.loads((tmp_path / "exported-again" / "training.json").read_text())
    assert again["steps"] == 3 and again["continued_from"] == record and again["vae"] == record["vae"]


def test_a_warm_started_run_trains_its_own_vae_from_step_0_on_an_exported_models_weights(tmp_path):
    from studio.toyworld import model as toymodel
    from studio.toyworld.train import load_exported_weights

    pipe = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    export(tmp_path / "a", pipe, tmp_path / "exported")
    record = json.loads((tmp_path / "exported" / "training.json").read_text())
    cfg = BaseTrainConfig(steps=1, vae_thumbnail_weight=10.0, **TINY)
    new = train_base(tmp_path / "b", paths.TOKENIZER, replace(cfg, lr=0.0), progress=False,
                     warm_start=tmp_path / "exported")
    assert len((tmp_path / "b" / "loss.log").read_text().splitlines()) == 1  # step 0 only
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 1
    # its own VAE (a thumbnail one here), not the exported model's
    assert json.loads((tmp_path / "b" / "vae_report.json").read_text()) != record["vae"]
    # with a learning rate of 0 its weights are the exported ones, as fp16 stored them
    unet, text_encoder = toymodel.build_unet(), toymodel.build_text_encoder()
    load_exported_weights(tmp_path / "exported", unet, text_encoder)
    trained = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name, weight in unet.state_dict().items():
        assert torch.equal(weight, trained["unet"][name]), name
    assert not torch.equal(unet.conv_in.weight, toymodel.build_unet().conv_in.weight)
    export(tmp_path / "b", new, tmp_path / "exported-b")
    assert json.loads((tmp_path / "exported-b" / "training.json").read_text())["warm_started_from"] == record
    with pytest.raises(ValueError, match="give one of them"):
        train_base(tmp_path / "c", paths.TOKENIZER, cfg, progress=False, init_from=tmp_path / "exported",
                   warm_start=tmp_path / "exported")


def test_a_run_from_a_folder_that_is_no_exported_model_is_refused_in_one_sentence_and_leaves_nothing(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    (tmp_path / "not-a-model").mkdir()
    for option in ("--init-from", "--warm-start"):
        result = CliRunner().invoke(app, ["toyworld", "train", "--workdir", str(tmp_path / "run"), "--steps", "1",
                                          option, str(tmp_path / "not-a-model")])
        assert result.exit_code == 2, result.output
        assert "is not a model exported by `studio toyworld export` (it has no training.json" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_export_writes_the_ema_or_the_raw_weights_and_says_which(tmp_path):
    from diffusers import UNet2DConditionModel
    from typer.testing import CliRunner

    from studio.cli import app

    train_base(tmp_path / "run", paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for weights, key in (("raw", "unet"), ("ema", "ema_unet")):
        result = CliRunner().invoke(app, ["toyworld", "export", "--workdir", str(tmp_path / "run"),
                                          "--out", str(tmp_path / weights), "--weights", weights])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / weights / "training.json").read_text())["weights"] == weights
        exported = UNet2DConditionModel.from_pretrained(str(tmp_path / weights), subfolder="unet").state_dict()
        name = "conv_in.weight"
        assert torch.equal(exported[name], checkpoint[key][name].half()), weights
    result = CliRunner().invoke(app, ["toyworld", "export", "--workdir", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "x"), "--weights", "best"])
    assert result.exit_code != 0 and "--weights must be ema or raw" in result.output


def test_a_resumed_run_keeps_the_recipe_it_started_with(tmp_path):
    train_base(tmp_path, paths.TOKENIZER, BaseTrainConfig(steps=1, vae_thumbnail_weight=10.0, **TINY), progress=False)
    train_base(tmp_path, paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vae_thumbnail_weight"] == 10.0 and config["steps"] == 2
    del config["vae_thumbnail_weight"]  # a run started before the field existed had a free latent
    (tmp_path / "config.json").write_text(json.dumps(config))
    train_base(tmp_path, paths.TOKENIZER, BaseTrainConfig(steps=3, vae_thumbnail_weight=10.0, **TINY), progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["vae_thumbnail_weight"] == 0.0

    from typer.testing import CliRunner

    from studio.cli import app

    result = CliRunner().invoke(app, ["toyworld", "train", "--workdir", str(tmp_path), "--steps", "3",
                                      "--vae-thumbnail-weight", "10"])
    assert result.exit_code == 0, result.output
    assert "continues with its own recipe" in result.output


def test_learning_rate_warms_up_holds_then_decays_to_zero_over_the_last_steps():
    from studio.toyworld.train import learning_rate

    cfg = BaseTrainConfig(lr=1e-3, warmup=10, steps=100, decay_steps=40)
    rates = [learning_rate(cfg, step) for step in range(100)]
    assert rates[0] == 1e-4 and rates[9] == rates[59] == 1e-3
    assert all(a > b for a, b in zip(rates[60:], rates[61:])) and rates[99] < 1e-5
    assert learning_rate(BaseTrainConfig(lr=1e-3, warmup=10, steps=100), 99) == 1e-3  # no decay: constant
    continued = BaseTrainConfig(lr=1e-3, warmup=10, steps=200, warmup_start=100)
    assert learning_rate(continued, 100) == 1e-4 and learning_rate(continued, 109) == 1e-3


def test_a_decay_added_when_resuming_is_the_run_that_started_with_it(tmp_path):
    straight = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=4, decay_steps=2, **TINY),
                          progress=False)
    train_base(tmp_path / "b", paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    resumed = train_base(tmp_path / "b", paths.TOKENIZER, BaseTrainConfig(steps=4, decay_steps=2, **TINY),
                         progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["decay_steps"] == 2
    # once in its decay, a run is not lengthened (it would no longer be the run its recipe describes)
    train_base(tmp_path / "b", paths.TOKENIZER, BaseTrainConfig(steps=6, decay_steps=2, **TINY), progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["steps"] == 4
    for (name, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_thumbnail_vae_pulls_its_latents_towards_the_image_thumbnail(tmp_path):
    import torch.nn.functional as F

    from studio.toyworld import model as toymodel
    from studio.toyworld.train import render_batch, thumbnail_latent_target, train_vae

    def distance_to_thumbnail(vae):
        images, _ = render_batch(5, 0, 8)
        with torch.no_grad():
            means = vae.encode(images).latent_dist.mean
        return float(F.mse_loss(means, thumbnail_latent_target(images)))

    torch.manual_seed(0)
    before = distance_to_thumbnail(toymodel.build_vae())
    cfg = BaseTrainConfig(vae_steps=40, vae_batch_size=4, vae_thumbnail_weight=10.0)
    after = distance_to_thumbnail(train_vae(tmp_path, cfg, progress=False))
    assert after < 0.25 * before


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
    from studio.toyworld.lora_train import LoraTrainConfig, lora_scene, train_lora, training_batch

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
    with pytest.raises(ValueError, match="unknown texture or palette 'teal'"):
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


@pytest.mark.parametrize("option, value, message", [("object_weight", 0.0, "the object weight must be above 0"),
                                                     ("prior_fraction", 1.0, "the prior fraction must be at least 0")])
def test_a_bad_lora_training_option_is_refused_before_the_pipeline_is_touched(tiny_pipe, tmp_path, option, value,
                                                                              message):
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=1, batch_size=2, rank=2,
                          **{option: value})
    with pytest.raises(ValueError, match=message):
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
    assert "the prior fraction must be at least 0 and below 1" in result.output and "1.5" in result.output
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


def test_tuning_a_models_decoder_keeps_its_encoder_and_records_itself_and_a_failure_leaves_the_model_as_it_was(
        tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.toyworld import train as training
    from studio.toyworld.train import DecoderTuneConfig, tune_model_decoder

    pipe = train_base(tmp_path / "a", paths.TOKENIZER, BaseTrainConfig(steps=1, **TINY), progress=False)
    model = tmp_path / "exported"
    export(tmp_path / "a", pipe, model)
    before = AutoencoderKL.from_pretrained(str(model / "vae")).state_dict()
    drawn = []
    render_batch = training.render_batch
    monkeypatch.setattr(training, "render_batch",
                        lambda *args, **kwargs: drawn.append(kwargs) or render_batch(*args, **kwargs))
    tuning = tune_model_decoder(model, DecoderTuneConfig(steps=2, batch_size=2), progress=False)
    # its training renders also show what only the LoRAs teach (the decoder is every LoRA's codec)
    from studio.toyworld.render import NOVEL_SHAPES, NOVEL_TEXTURES
    taught = [kwargs for kwargs in drawn if kwargs]
    assert len(taught) == 2 and all(set(NOVEL_SHAPES) <= set(kwargs["shapes"])
                                    and set(NOVEL_TEXTURES) <= set(kwargs["textures"]) for kwargs in taught)
    assert not any("palettes" in kwargs for kwargs in taught)  # palettes only when asked (--palettes)
    drawn.clear()
    tune_model_decoder(model, DecoderTuneConfig(steps=1, batch_size=2, palettes=True), progress=False)
    from studio.toyworld.render import NOVEL_PALETTES
    assert [kwargs["palettes"] for kwargs in drawn if kwargs] == [NOVEL_PALETTES]
    after = AutoencoderKL.from_pretrained(str(model / "vae"))
    from safetensors.torch import load_file
    stored = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    assert {weight.dtype for weight in stored.values()} == {torch.float16}  # as `export` writes it
    assert after.config.scaling_factor == pipe.vae.config.scaling_factor
    state = after.state_dict()
    # the encoder (so the latents the UNet learnt) is untouched; the decoder has trained
    assert all(torch.equal(state[name], before[name]) for name in state if name.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(state["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    assert not torch.equal(state["post_quant_conv.weight"], before["post_quant_conv.weight"])
    record = json.loads((model / "training.json").read_text())
    assert record["decoder_tuned"][0] == tuning and tuning["steps"] == 2 and record["steps"] == 1
    assert [t["palettes"] for t in record["decoder_tuned"]] == [False, True]
    assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == []

    # a tuning that fails half-way leaves the model's VAE and record untouched
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "tune_decoder", interrupted)
    weights = (model / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        tune_model_decoder(model, DecoderTuneConfig(steps=2, batch_size=2), progress=False)
    assert (model / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert json.loads((model / "training.json").read_text()) == record

    (tmp_path / "not-a-model").mkdir()
    result = CliRunner().invoke(app, ["toyworld", "tune-decoder", "--model", str(tmp_path / "not-a-model")])
    assert result.exit_code == 2 and "is not a model exported by `studio toyworld export`" in result.output
    assert list((tmp_path / "not-a-model").iterdir()) == []


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
    assert "a learnt embedding needs a made-up word" in known.output and not (tmp_path / "never.safetensors").exists()
    # options that shape the shapes world's captions are refused where there are none to shape, in one sentence
    concept = CliRunner().invoke(app, ["toyworld", "train-lora", "--kind", "concept", "--subject", "cross", "--trigger",
                                       "ohwx", "--out", str(tmp_path / "never.safetensors"), "--steps", "1",
                                       "--trigger-after-noun", *model])
    assert concept.exit_code == 2 and concept.output.count("\n") == 1
    assert "only a style's trigger can stand after the noun" in concept.output
    (tmp_path / "images").mkdir()
    folder = CliRunner().invoke(app, ["b4m", "break", "--role", "style", "--images", str(tmp_path / "images"),
                                      "--trigger-after-noun", "--out", str(tmp_path / "never.safetensors"), *model])
    assert folder.exit_code == 2 and folder.output.count("\n") == 1
    assert "with --images the captions are yours" in folder.output
    assert not (tmp_path / "never.safetensors").exists()
