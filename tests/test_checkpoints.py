"""Single-file checkpoints loaded offline from the shipped configurations, and A1111 / ComfyUI folders.

The pipelines exported here have the SD1.5, SD2 and SDXL layouts at tiny widths (every weight random):
the loader sizes the shipped configuration from the checkpoint's tensors, so they load exactly as a
full-size file would, in seconds. Head counts follow the loader's rule for widths it does not know
(64-wide heads; SD1's UNet eight per layer), so the loaded models compute exactly what the originals do.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio import checkpoints
from studio.errors import StudioError
from studio.architectures import SCHEDULER, _tokenizer
from studio.errors import ModelNotAvailable
from studio.models import FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL, load_base_model
from tests.ldm_export import export_single_file

CA, D, U, CU = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
BOOKKEEPING = {"transformers_version", "torch_dtype", "dtype", "architectures"}


def _text_encoder(cls, width, layers, act):
    # token ids as the shipped (public) configurations have them
    return cls(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=max(1, width // 64), max_position_embeddings=77, hidden_act=act,
                              projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1))


def _vae(**extra):
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=32, sample_size=64, **extra)


def tiny_sd1():
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=(CA, D), up_block_types=(U, CU),
                                layers_per_block=2, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
                                sample_size=8)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(CLIPTextModel, 64, 2, "quick_gelu"),
                                   tokenizer=_tokenizer(), unet=unet, scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def tiny_sd2():
    unet = UNet2DConditionModel(block_out_channels=(64, 128), down_block_types=(CA, D), up_block_types=(U, CU),
                                layers_per_block=2, cross_attention_dim=64, attention_head_dim=[1, 2],
                                use_linear_projection=True, upcast_attention=True, norm_num_groups=32, sample_size=8)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(CLIPTextModel, 64, 2, "gelu"),
                                   tokenizer=_tokenizer("!"), unet=unet, scheduler=DDIMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)


def tiny_sdxl():
    # the two encoders must differ in width, as CLIP-L (768) and bigG (1280) do: diffusers tells them apart so
    unet = UNet2DConditionModel(block_out_channels=(64, 128), down_block_types=(D, CA), up_block_types=(CU, U),
                                layers_per_block=2, transformer_layers_per_block=[1, 2], cross_attention_dim=64 + 128,
                                attention_head_dim=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=128 + 6 * 8,
                                norm_num_groups=32, sample_size=8)
    return StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=_text_encoder(CLIPTextModel, 64, 2, "quick_gelu"),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, 128, 2, "gelu"),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer("!"), unet=unet, scheduler=DDIMScheduler(**SCHEDULER),
        image_encoder=None, feature_extractor=None)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_weights(original, loaded, names):
    for name in names:
        ours, theirs = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)


def assert_same_text_features(original, loaded, names=("text_encoder",)):
    ids = original.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    for name in names:
        with torch.no_grad():
            ours = getattr(original, name)(ids, output_hidden_states=True)
            theirs = getattr(loaded, name)(ids, output_hidden_states=True)
        assert torch.allclose(ours.hidden_states[-2], theirs.hidden_states[-2], atol=1e-6), name
        assert torch.allclose(ours[0], theirs[0], atol=1e-6), name


def test_sd15_checkpoint_loads_offline_without_config(tmp_path):
    torch.manual_seed(0)
    original = tiny_sd1()
    path = export_single_file(original, tmp_path / "sd15-model.safetensors")
    assert checkpoints.checkpoint_family(path) == FAMILY_SD1
    assert not checkpoints.is_v_prediction(path)
    pipe = load_base_model(path, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert_same_weights(original, pipe, ("unet", "vae", "text_encoder"))
    assert_same_text_features(original, pipe)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # SD1.5's published scheduler
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.block_out_channels == [32, 64] and pipe.unet.config.cross_attention_dim == 64
    assert pipe.unet.config.attention_head_dim == 8 and not pipe.unet.config.use_linear_projection
    assert pipe.vae.config.scaling_factor == 0.18215
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.allclose(original.unet(sample, 10, text).sample, pipe.unet(sample, 10, text).sample, atol=1e-5)


def test_sd2_checkpoint_flagged_v_by_its_yaml_loads_as_768_v(tmp_path):
    torch.manual_seed(1)
    original = tiny_sd2()
    path = export_single_file(original, tmp_path / "sd2-768.safetensors")
    assert checkpoints.checkpoint_family(path) == FAMILY_SD2
    assert not checkpoints.is_v_prediction(path)  # nothing says v yet: SD2 512 base
    (tmp_path / "sd2-768.yaml").write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n'
                                           '    parameterization: "v"\n    linear_start: 0.00085\n')
    assert checkpoints.is_v_prediction(path)
    pipe = load_base_model(path, device="cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert_same_weights(original, pipe, ("unet", "vae", "text_encoder"))
    # the file holds a third, unused OpenCLIP block (SD2 conditions on the penultimate one): not loaded
    assert pipe.text_encoder.config.num_hidden_layers == 2
    assert_same_text_features(original, pipe)
    assert pipe.tokenizer.pad_token == "!"
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    assert list(pipe.unet.config.attention_head_dim) == [1, 2]


def test_sd2_without_a_v_marker_is_the_epsilon_base_and_metadata_can_say_v(tmp_path):
    torch.manual_seed(2)
    original = tiny_sd2()
    plain = export_single_file(original, tmp_path / "sd2-base.safetensors")
    pipe = load_base_model(plain, device="cpu")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert not pipe.unet.config.upcast_attention  # the 512 base configuration
    flagged = export_single_file(original, tmp_path / "sd2-v.safetensors", metadata={"modelspec.prediction_type": "v"})
    assert checkpoints.is_v_prediction(flagged)
    kohya = export_single_file(original, tmp_path / "sd2-kohya.safetensors", metadata={"ss_v_parameterization": "True"})
    assert checkpoints.is_v_prediction(kohya)
    (tmp_path / "sd2-base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # an epsilon yaml
    assert not checkpoints.is_v_prediction(plain)


def test_sdxl_checkpoint_loads_offline_with_v_pred_marker(tmp_path):
    torch.manual_seed(3)
    original = tiny_sdxl()
    path = export_single_file(original, tmp_path / "xl.safetensors", extra={"v_pred": torch.tensor([])})
    assert checkpoints.checkpoint_family(path) == FAMILY_SDXL
    assert checkpoints.is_v_prediction(path)
    pipe = load_base_model(path, device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert_same_weights(original, pipe, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert_same_text_features(original, pipe, ("text_encoder", "text_encoder_2"))
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    config = pipe.unet.config
    assert config.addition_time_embed_dim == 8 and config.projection_class_embeddings_input_dim == 176
    assert list(config.transformer_layers_per_block) == [1, 2] and config.cross_attention_dim == 192
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 192)
    added = {"text_embeds": torch.randn(1, 128), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        ours = original.unet(sample, 10, text, added_cond_kwargs=added).sample
        theirs = pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_v_and_zero_snr_markers_reach_the_scheduler_with_or_without_a_config(tmp_path):
    torch.manual_seed(4)
    original = tiny_sd1()
    path = export_single_file(original, tmp_path / "vpred.safetensors",
                              extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    pipe = load_base_model(path, device="cpu")
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # SD1.5's PNDM cannot rescale to zero terminal SNR
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    folder = tmp_path / "config"
    original.save_pretrained(folder)
    pipe = load_base_model(path, device="cpu", config=folder)
    assert_same_weights(original, pipe, ("unet", "vae", "text_encoder"))
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr


@pytest.mark.parametrize("name, family", [("sd15", FAMILY_SD1), ("sd2", FAMILY_SD2), ("sd2-base", FAMILY_SD2),
                                          ("sdxl", FAMILY_SDXL)])
def test_a_published_size_checkpoint_gets_the_published_configuration(name, family):
    """Sizing from the tensors changes nothing for a checkpoint of the published shape: the header of a
    full-size export (models on the meta device, nothing loaded) derives the shipped configuration."""
    from studio.lora.header import SafetensorsHeader, TensorEntry
    from tests.ldm_export import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    folder = checkpoints.configs_folder() / name
    shipped = {part: json.loads((folder / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / part).is_dir()}
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(shipped["unet"]),
                  "vae": AutoencoderKL.from_config(shipped["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**shipped["text_encoder"]))}
        if family == FAMILY_SDXL:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**shipped["text_encoder_2"]))
    unet = shipped["unet"]
    state = {**unet_to_ldm(models["unet"].state_dict(), unet["layers_per_block"], len(unet["block_out_channels"])),
             **vae_to_ldm(models["vae"].state_dict(), 4)}
    text = models["text_encoder"].state_dict()
    if family == FAMILY_SD1:
        state.update(clip_to_ldm(text, "cond_stage_model.transformer."))
    elif family == FAMILY_SD2:  # 24 OpenCLIP blocks in the file, 23 in diffusers' encoder
        state.update(open_clip_to_ldm(text, "cond_stage_model.model.", extra_blocks=1))
    else:
        state.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(models["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    header = SafetensorsHeader({k: TensorEntry("F16", tuple(v.shape), 0, 0) for k, v in state.items()}, {}, 0)
    derived = checkpoints.derived_configs(folder, header, family)
    assert set(derived) == set(shipped)
    for part, config in derived.items():
        reference = models[part].config
        reference = reference.to_dict() if hasattr(reference, "to_dict") else dict(reference)
        changed = {k: (reference[k], v) for k, v in config.items()
                   if k in reference and k not in BOOKKEEPING and not k.startswith("_") and json.loads(json.dumps(reference[k])) != json.loads(json.dumps(v))}
        assert not changed, (part, changed)
        assert {k: v for k, v in config.items() if k in shipped[part]} == shipped[part], part


def test_refusals_are_one_sentence(tmp_path):
    pickle = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, pickle)
    with pytest.raises(ModelNotAvailable, match="not a readable safetensors file") as info:
        load_base_model(pickle, device="cpu")
    assert "\n" not in str(info.value)
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(lora))
    with pytest.raises(ModelNotAvailable, match="is it a LoRA") as info:
        load_base_model(lora, device="cpu")
    message = str(info.value)
    assert "\n" not in message and message.count(". ") <= 1 and message.startswith("style.safetensors")
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(unet_only))
    with pytest.raises(ModelNotAvailable, match="holds no text encoder"):
        load_base_model(unet_only, device="cpu")


def test_incomplete_checkpoints_are_refused_in_one_sentence(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(5)
    state = load_file(str(export_single_file(tiny_sd1(), tmp_path / "full.safetensors")))
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "no-vae.safetensors"))
    with pytest.raises(ModelNotAvailable, match=r"^no-vae.safetensors is an incomplete SD1.x checkpoint: it holds no VAE"):
        load_base_model(tmp_path / "no-vae.safetensors", device="cpu")
    missing = "model.diffusion_model.input_blocks.1.1.proj_in.bias"
    save_file({k: v for k, v in state.items() if k != missing}, str(tmp_path / "holed.safetensors"))
    with pytest.raises(ModelNotAvailable, match=r"^holed.safetensors lacks weights the SD1.x configuration needs; "
                                                r"the file is incomplete or of a layout the studio does not know.$"):
        load_base_model(tmp_path / "holed.safetensors", device="cpu")


def _fake_checkpoint(path, family=FAMILY_SD1, in_channels=4):
    text = {FAMILY_SD1: "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            FAMILY_SD2: "cond_stage_model.model.token_embedding.weight",
            FAMILY_SDXL: "conditioner.embedders.1.model.token_embedding.weight"}[family]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
               text: torch.zeros(4, 8)}, str(path))
    return path


def _fake_lora(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_find_models_in_an_a1111_install(tmp_path):
    models = tmp_path / "stable-diffusion-webui" / "models"
    a = _fake_checkpoint(models / "Stable-diffusion" / "a.safetensors")
    b = _fake_checkpoint(models / "Stable-diffusion" / "XL" / "b.safetensors", FAMILY_SDXL)
    _fake_checkpoint(models / "Stable-diffusion" / "inpaint.safetensors", in_channels=9)
    (models / "Stable-diffusion" / "old.ckpt").write_bytes(b"PK\x03\x04")
    _fake_lora(models / "Lora" / "style.safetensors")
    (models / "LyCORIS").mkdir()
    for root in (tmp_path, tmp_path / "stable-diffusion-webui", models):
        found = checkpoints.find_models(root)
        assert found.kind == "A1111"
        assert found.checkpoints == sorted([a, b])
        assert found.lora_folders == [models / "Lora", models / "LyCORIS"]


def test_find_models_in_a_comfyui_install(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    sd2 = _fake_checkpoint(models / "checkpoints" / "sd2.safetensors", FAMILY_SD2)
    _fake_lora(models / "checkpoints" / "misplaced-lora.safetensors")
    (models / "loras").mkdir(parents=True)
    found = checkpoints.find_models(tmp_path)
    assert (found.kind, found.checkpoints, found.lora_folders) == ("ComfyUI", [sd2], [models / "loras"])


def test_find_models_in_a_plain_folder_reads_headers(tmp_path):
    one = _fake_checkpoint(tmp_path / "one.safetensors")
    two = _fake_checkpoint(tmp_path / "more" / "two.safetensors", FAMILY_SDXL)
    _fake_lora(tmp_path / "styles" / "a.safetensors")
    _fake_lora(tmp_path / "styles" / "b.safetensors")
    _fake_lora(tmp_path / "people" / "c.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    found = checkpoints.find_models(tmp_path)
    assert found.kind == "folder"
    assert found.checkpoints == sorted([one, two])
    assert found.lora_folders == [tmp_path / "people", tmp_path / "styles"]
    with pytest.raises(ModelNotAvailable, match="is not a folder"):
        checkpoints.find_models(tmp_path / "missing")


def test_find_models_tells_real_lora_files_from_checkpoints(tmp_path):
    from tests.conftest import fixture_file

    names = ["lora/lokr/smart_falcon_4_lokr.safetensors", "lora/diffusers/diffusers_sd-pokemon-model-lora.safetensors",
             "lora/legacy_attnproc/catundchat_weapons_sd15.safetensors",
             "lora/malformed/timohavdk_new_bad_kohya.safetensors"]
    for index, name in enumerate(names):
        (tmp_path / f"set{index}").mkdir()
        (tmp_path / f"set{index}" / Path(name).name).symlink_to(fixture_file(name))
    checkpoint = _fake_checkpoint(tmp_path / "set0" / "model.safetensors")
    found = checkpoints.find_models(tmp_path)
    assert found.checkpoints == [checkpoint]
    assert found.lora_folders == [tmp_path / f"set{index}" for index in range(len(names))]


def test_a_models_folder_lists_in_the_cli_and_the_api_loads_its_checkpoint_by_name(tmp_path):

    from typer.testing import CliRunner

    from studio.api import Studio
    from studio.cli import app

    torch.manual_seed(0)
    models = tmp_path / "stable-diffusion-webui" / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    checkpoint = export_single_file(tiny_sd1(), models / "Stable-diffusion" / "tiny-sd15.safetensors")
    lora = _fake_lora(models / "Lora" / "style.safetensors")
    listed = CliRunner().invoke(app, ["models", str(tmp_path / "stable-diffusion-webui"), "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == {"kind": "A1111", "checkpoints": [str(checkpoint)],
                                         "lora_folders": [str(models / "Lora")]}
    studio = Studio.load("tiny-sd15", models=tmp_path / "stable-diffusion-webui")
    assert studio.model_ref == str(checkpoint) and studio.model_name == "tiny-sd15"
    assert studio.library.find("style") == lora
    with pytest.raises(StudioError, match="No checkpoint named nope in the models folder"):
        Studio.load("nope", models=tmp_path / "stable-diffusion-webui")
