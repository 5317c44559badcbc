"""Presets fuzzed (hypothesis): random, truncated and wrong-typed JSON, boxes outside the image, absurd sizes, steps,
weights and seeds, unknown methods and parameters, LoRA paths climbing out of the library. Whatever arrives, the
web studio's gate either admits a composition that is within its limits and names only files inside its folders,
or refuses it with one sentence (a StudioError) before anything runs; it never raises anything else and never
opens a file outside the allowed folders."""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composers import registry
from studio import paths
from studio.errors import StudioError
from studio.limits import Limits

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)), max_leaves=20)
climbing_paths = st.one_of(
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "/etc/hostname", "~/.ssh/id_rsa", "..", "/", "",
                     "../" * 12 + "etc/shadow", "sub/../../x.safetensors", "C:\\Windows\\win.ini", "\0",
                     "alpha.safetensors", "uploads/../alpha.safetensors", "/proc/self/environ"]),
    st.text(alphabet="./\\~abc-_", max_size=40))
nasty = st.one_of(json_values, st.integers(min_value=-10**9, max_value=10**9), st.floats(), climbing_paths)
FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "scheduler", "seed", "method", "params",
          "decor", "decor_strength", "version", "base_model", "loras", "unknown_field"]
LORA_FIELDS = ["file", "sha256", "weight", "text_encoder_weight", "role", "trigger_words", "region", "prompt",
               "decor", "decor_strength", "bogus"]


def valid_composition() -> dict:
    return {"prompt": "a large solid red sks on the left and a blue ohwx on the right", "steps": 2, "seed": 1,
            "method": "regional",
            "loras": [{"file": "alpha.safetensors", "trigger_words": ["sks"], "region": {"box": [0, 0, 0.5, 1]}},
                      {"file": "beta.safetensors", "trigger_words": ["ohwx"], "region": {"box": [0.5, 0, 1, 1]}}]}


@st.composite
def mutated_compositions(draw):
    data = valid_composition()
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(["top", "lora", "box", "params"]))
        if target == "top":
            data[draw(st.sampled_from(FIELDS))] = draw(nasty)
        elif target == "lora" and isinstance(data.get("loras"), list) and data["loras"]:
            entry = data["loras"][draw(st.integers(0, len(data["loras"]) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(LORA_FIELDS))] = draw(st.one_of(nasty, climbing_paths))
        elif target == "box" and isinstance(data.get("loras"), list) and data["loras"] \
                and isinstance(data["loras"][0], dict):
            data["loras"][0]["region"] = {"box": draw(st.lists(st.floats(-2, 3), min_size=0, max_size=5))}
        else:
            data["method"] = draw(st.sampled_from([*registry(), "dreambooth", ""]))
            data["params"] = draw(st.dictionaries(st.sampled_from(["step_size", "max_iter", "bogus", "switch_step",
                                                                   "regional_layers", "alpha"]), nasty, max_size=3))
    return data


@pytest.fixture(scope="module")
def gate(tiny_folder, tiny_loras, tmp_path_factory):
    """The web studio's state on the tiny model, its library holding alpha and beta."""
    from studio.webapp import StudioState

    library = tmp_path_factory.mktemp("fuzzlibrary")
    for name in ("alpha", "beta"):
        shutil.copy(tiny_loras[name], library / f"{name}.safetensors")
    return StudioState(str(tiny_folder), library=str(library), limits=Limits.for_device("cpu"))


@pytest.fixture(scope="module")
def open_watch():
    """Paths opened while `watch[0]` is True (Python's audit hook sees every open())."""
    opened, watch = [], [False]

    def hook(event, args):
        if watch[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(hook)
    return opened, watch


def admit(gate, open_watch, text: str):
    """Run the gate on preset text; check the outcome's invariants; return the composition or None."""
    from studio.lora.hashes import cache_dir
    from studio.webapp import composition_from_text

    opened, watch = open_watch
    opened.clear()
    watch[0] = True
    try:
        composition = gate.admit(composition_from_text(gate, text))
    except StudioError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        composition = None
    finally:
        watch[0] = False
    allowed = [os.path.abspath(f) for f in gate.studio.library.folders] + [os.path.abspath(cache_dir()),
                                                                           sys.prefix, os.path.abspath(paths.ASSETS)]
    outside = [p for p in opened if not any(os.path.commonpath([p, a]) == a for a in allowed)]
    assert not outside, f"opened outside the allowed folders: {outside}"
    if composition is not None:
        limits = gate.limits
        width, height = composition.width or gate.size, composition.height or gate.size
        assert width * height <= limits.max_pixels and composition.steps <= limits.max_steps
        assert len(composition.loras) <= limits.max_loras and composition.method in registry()
        assert math.isfinite(composition.guidance) and 0 <= composition.seed < 2**64
        for entry in composition.loras:
            assert gate.studio.library.inside(entry.file) is not None, entry.file
            assert math.isfinite(entry.weight)
            if entry.region is not None and entry.region.box is not None:
                x0, y0, x1, y1 = entry.region.box
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    return composition


def test_the_unmutated_composition_is_admitted(gate, open_watch):
    composition = admit(gate, open_watch, json.dumps(valid_composition()))
    assert composition is not None and [Path(e.file).name for e in composition.loras] == ["alpha.safetensors",
                                                                                          "beta.safetensors"]


@SETTINGS
@given(value=json_values)
def test_random_json_is_admitted_or_refused_in_one_sentence(gate, open_watch, value):
    admit(gate, open_watch, json.dumps(value))


@SETTINGS
@given(cut=st.integers(0, 2000), preset=st.sampled_from(sorted(paths.EXAMPLE_PRESETS.glob("*.json"))))
def test_truncated_presets_are_refused(gate, open_watch, cut, preset):
    text = preset.read_text()
    composition = admit(gate, open_watch, text[:cut])
    assert composition is None or cut >= len(text.rstrip())


@SETTINGS
@given(data=mutated_compositions())
def test_mutated_compositions_are_admitted_only_within_limits_and_folders(gate, open_watch, data):
    admit(gate, open_watch, json.dumps(data))


@SETTINGS
@given(file=climbing_paths)
def test_no_lora_path_reaches_outside_the_library(gate, open_watch, file):
    data = valid_composition()
    data["loras"][0]["file"] = file
    composition = admit(gate, open_watch, json.dumps(data))
    if composition is not None:
        assert Path(composition.loras[0].file).resolve().parent == Path(gate.library).resolve()
