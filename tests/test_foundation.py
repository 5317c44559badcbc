"""The installable studio: imports, the `studio` command, base-model loading and placement."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.errors import ModelNotAvailable, StudioError
from studio.models import choose_placement, load_base_model, model_family

ROOT = Path(__file__).resolve().parent.parent
STUDIO = [sys.executable, "-m", "studio.cli"]


def test_packages_import():
    subprocess.run([sys.executable, "-c", "import studio, composers, attention"], check=True, cwd="/")


def test_help_lists_the_subcommands():
    out = subprocess.run(STUDIO + ["--help"], capture_output=True, text=True, check=True).stdout
    for name in ("serve", "generate", "inspect", "batch", "bench", "methods", "toyworld"):
        assert name in out


def test_cpu_placement_is_fp32_sdpa_and_overridable():
    assert choose_placement("cpu") == choose_placement("cpu", None)
    placement = choose_placement("cpu")
    assert (placement.device, placement.dtype, placement.attention) == ("cpu", torch.float32, "sdpa")
    assert choose_placement("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(StudioError, match="Unknown dtype"):
        choose_placement("cpu", "fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_requested_without_cuda_is_one_sentence():
    with pytest.raises(StudioError, match="CUDA is not available"):
        choose_placement("cuda")


def test_bundled_default_model_loads_and_generates(shapes_pipe):
    from studio.generation import GenerationSettings, generate_plain

    assert model_family(shapes_pipe) == "shapes-world"
    assert shapes_pipe.device.type == "cpu" and shapes_pipe.unet.dtype == torch.float32
    image = generate_plain(shapes_pipe, GenerationSettings("a large solid red circle in the centre, white background",
                                                           steps=4))
    assert image.size == (64, 64)


def test_local_folder_loads(shapes_pipe, tmp_path):
    shapes_pipe.save_pretrained(tmp_path / "copy")
    pipe = load_base_model(tmp_path / "copy")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for name, param in shapes_pipe.unet.named_parameters():
        assert torch.equal(param, dict(pipe.unet.named_parameters())[name])
        break


def test_hub_id_offline_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable) as info:
        load_base_model("someone/some-model")
    message = str(info.value)
    assert "not available locally" in message and "\n" not in message and ".safetensors" in message


def test_bad_references_fail_in_one_sentence(tmp_path):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not really a pickle")
    with pytest.raises(ModelNotAvailable, match="pickled checkpoints"):
        load_base_model(pickled)
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(ModelNotAvailable, match="not a diffusers pipeline"):
        load_base_model(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 32)
    with pytest.raises(ModelNotAvailable, match="not a readable safetensors file"):
        load_base_model(garbage)
    with pytest.raises(ModelNotAvailable, match="No model at"):
        load_base_model(tmp_path / "missing.safetensors")


def test_single_file_checkpoint_loads_with_a_local_config(tiny_pipe, tmp_path):
    from tests.ldm_export import export_single_file

    folder = tmp_path / "config"
    tiny_pipe.save_pretrained(folder)
    checkpoint = export_single_file(tiny_pipe, tmp_path / "model.safetensors")
    pipe = load_base_model(checkpoint, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(ours) <= set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)


def test_a_single_file_checkpoint_that_no_shipped_configuration_fits_is_one_sentence(tiny_pipe, tmp_path, monkeypatch):
    from tests.ldm_export import export_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = export_single_file(tiny_pipe, tmp_path / "model.safetensors")
    with pytest.raises(ModelNotAvailable, match="pass --config"):
        load_base_model(checkpoint)
