import gc
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "LORA_STUDIO_OUTPUTS" not in os.environ:  # web studios started by the tests keep their results out of ~
    import tempfile

    os.environ["LORA_STUDIO_OUTPUTS"] = tempfile.mkdtemp(prefix="lora-studio-test-outputs-")
logging.getLogger("diffusers").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


def fixture_file(relative: str) -> Path:
    """A verified file of ../shared/fixtures, or a clean skip when the folder is absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"../shared/fixtures/{relative} is absent")
    sums = dict(line.split()[::-1] for line in (FIXTURES / "SHA256SUMS").read_text().splitlines() if line.strip())
    expected = sums.get(f"./{relative}")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert expected == actual, f"{relative} does not match SHA256SUMS"
    return path


@pytest.fixture(scope="session")
def sd15_pipe():
    from studio.architectures import random_sd15_pipeline

    pipe = random_sd15_pipeline()
    yield pipe
    del pipe
    gc.collect()


@pytest.fixture(scope="module")
def sdxl_pipe():
    """SDXL's 3.5 B parameters take 14 GB in fp32: built once, for the one module that uses it."""
    from studio.architectures import random_sdxl_pipeline

    pipe = random_sdxl_pipeline()
    yield pipe
    del pipe
    gc.collect()


@pytest.fixture(scope="session")
def shapes_pipe():
    from studio.models import load_base_model

    return load_base_model()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The shapes-world architecture with random weights: fast, for the composition mechanics."""
    from studio import paths
    from studio.toyworld import model as toymodel

    torch.manual_seed(0)
    pipe = toymodel.assemble_pipeline(toymodel.build_vae(), toymodel.build_text_encoder(),
                                      toymodel.build_tokenizer(paths.TOKENIZER), toymodel.build_unet())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_loras(tiny_pipe, tmp_path_factory):
    """Two concept LoRAs (triggers 'sks', 'ohwx') and a style LoRA for the tiny pipeline."""
    from studio.lora.synthetic import write_random_lora

    folder = tmp_path_factory.mktemp("loras")
    return {name: write_random_lora(folder / f"{name}.safetensors", tiny_pipe, "shapes_world_v1", seed=seed,
                                    trigger=trigger)
            for name, seed, trigger in (("alpha", 1, "sks"), ("beta", 2, "ohwx"), ("gamma", 3, None))}


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder, for what loads a model by path (CLI, batches, Ray workers)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_pipe.save_pretrained(folder)
    return folder
