import json
from dataclasses import replace

import pytest
import torch

from studio import paths
from studio.errors import StudioError
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
    with pytest.raises(StudioError, match="give one of them"):
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

