import gc
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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


@pytest.fixture(scope="session")
def sdxl_pipe():
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
