"""The real LoRA files of ../shared/fixtures get the outcome their README documents, through
`inspect` (in process and as `python -m studio.cli inspect FILE --json`) and through `attach_lora` on
SD1.5's exact architecture. No fixture may produce a traceback: only one-sentence LoraErrors."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from studio.cli import app
from studio.errors import LoraError
from studio.lora import (
    attach_lora,
    attached_adapters,
    detach_lora,
    inspect_lora,
    load_lora,
    lora_layers,
)
from tests.conftest import ROOT, fixture_file

LOKR = "lora/lokr/smart_falcon_4_lokr.safetensors"
POKEMON = "lora/diffusers/diffusers_sd-pokemon-model-lora.safetensors"
BRAIN = "lora/diffusers/brain_mri_sd15.safetensors"
LEGACY = "lora/legacy_attnproc/catundchat_weapons_sd15.safetensors"
CLONEOFSIMO = "lora/cloneofsimo/cloneofsimo_lora_disney.safetensors"
MALFORMED = "lora/malformed/timohavdk_new_bad_kohya.safetensors"
SD21 = "lora/other_base/sd21_lora_xattn1024.safetensors"

# file -> (format, base model, modules, components)
USABLE = {
    LOKR: ("lycoris_lokr", "SD1.x", 350, {"unet": 278, "text_encoder": 72}),
    POKEMON: ("diffusers", "SD1.x", 128, {"unet": 128}),
    BRAIN: ("diffusers", "SD1.x", 128, {"unet": 128}),
    LEGACY: ("legacy_attn_procs", "SD1.x", 128, {"unet": 128}),
    CLONEOFSIMO: ("cloneofsimo", "SD1.x", 192, {"unet": 144, "text_encoder": 48}),
    SD21: ("diffusers", "SD2.x", 128, {"unet": 128}),
}
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pipe(sd15_pipe):
    """The shared SD1.5-shaped pipeline, with every adapter a test attached removed afterwards."""
    yield sd15_pipe
    for name in attached_adapters(sd15_pipe):
        detach_lora(sd15_pipe, name)
    assert lora_layers(sd15_pipe) == {}


def raw_tensor(path, key):
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key).float()


def tensor_bytes_sha256(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


# --- inspect ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", list(USABLE))
def test_inspect_identifies_each_fixture(relative):
    path = fixture_file(relative)
    info = inspect_lora(path)
    assert (info.format, info.base_model, info.modules, info.components) == USABLE[relative]
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.sha256, info.model_hash) == (sha256, sha256[:10])
    assert info.short_hash == tensor_bytes_sha256(path)[:12]


def test_inspect_reads_the_lokr_training_metadata():
    info = inspect_lora(fixture_file(LOKR))
    assert (info.rank, info.alpha, info.has_text_encoder) == (4, 4.0, True)
    assert info.trigger_words[0] == r"smart falcon \(umamusume\)"
    assert info.short_hash == info.metadata["sshs_model_hash"][:12]  # what its trainer wrote agrees with ours


def test_inspect_explains_the_malformed_fixture():
    with pytest.raises(LoraError, match=r"^timohavdk_new_bad_kohya\.safetensors is a malformed kohya LoRA"):
        inspect_lora(fixture_file(MALFORMED))


@pytest.mark.parametrize("relative", [POKEMON, MALFORMED])
def test_cli_inspect_json_in_a_subprocess(relative):
    path = fixture_file(relative)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "studio.cli", "inspect", str(path), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    data = json.loads(done.stdout)
    assert "Traceback" not in done.stderr
    if relative == MALFORMED:
        assert done.returncode != 0 and list(data) == ["error"] and data["error"].startswith(path.name)
    else:
        assert done.returncode == 0 and (data["format"], data["base_model"]) == ("diffusers", "SD1.x")


@pytest.mark.parametrize("relative", [*USABLE, MALFORMED])
def test_cli_inspect_json_for_every_fixture(relative):
    path = fixture_file(relative)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    data = json.loads(result.stdout)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if relative == MALFORMED:
        assert result.exit_code != 0 and "malformed kohya LoRA" in data["error"]
    else:
        assert result.exit_code == 0 and data["format"] == USABLE[relative][0] and data["name"] == path.name
    plain = CliRunner().invoke(app, ["inspect", str(path)])
    assert path.name in plain.output and "Traceback" not in plain.output


# --- attach to SD1.5 ---------------------------------------------------------------------------------------------


def test_pokemon_lora_lands_every_module_on_a_unet_layer(pipe):
    path = fixture_file(POKEMON)
    weights = load_lora(path)
    injected = attach_lora(pipe, weights, "pokemon")
    assert injected == weights.parameter_count() > 0
    layers = lora_layers(pipe)
    assert len(weights.modules) == 128
    for component, target in weights.modules:
        assert component == "unet" and "pokemon" in layers[f"unet.{target}"].adapters

    layer = pipe.unet.get_submodule(TO_K)
    down = raw_tensor(path, f"unet.{TO_K}.lora.down.weight")
    up = raw_tensor(path, f"unet.{TO_K}.lora.up.weight")
    x = torch.randn(1, 5, 768)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + up @ down, layer.base.bias),
                                   atol=1e-4, rtol=1e-5)


def test_brain_mri_lora_loads(pipe):
    assert attach_lora(pipe, fixture_file(BRAIN)) > 0
    assert len(lora_layers(pipe)) == 128


def test_legacy_attention_processor_lora_is_converted_and_matches_peft(pipe):
    """diffusers 0.42 'loads' this file and injects nothing; converted, it applies, and diffusers + PEFT
    loading our conversion gives the same layer output as the studio's injection."""
    path = fixture_file(LEGACY)
    weights = load_lora(path)
    target = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0"
    x = torch.randn(1, 7, 640)
    pipe.load_lora_weights(weights.to_peft_state_dict(), adapter_name="peft_check")
    try:
        with torch.no_grad():
            through_peft = pipe.unet.get_submodule(target)(x)
    finally:
        pipe.unload_lora_weights()
    assert attach_lora(pipe, weights, "weapons") == weights.parameter_count() > 0
    assert len(lora_layers(pipe)) == 128
    with torch.no_grad():
        ours = pipe.unet.get_submodule(target)(x)
        base = pipe.unet.get_submodule(target).base(x)
    torch.testing.assert_close(ours, through_peft, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, base)


def test_cloneofsimo_lora_is_placed_in_its_recovered_order(pipe):
    path = fixture_file(CLONEOFSIMO)
    weights = load_lora(path)
    assert weights.info.problems == [] and weights.info.embeddings == ["<s1>", "<s2>"]  # lora_pti's learnt words
    vocabulary = len(pipe.tokenizer)
    attach_lora(pipe, weights, "disney")
    assert pipe.tokenizer.tokenize("a <s1> <s2> castle")[1:3] == ["<s1>", "<s2>"]
    row = pipe.tokenizer.convert_tokens_to_ids("<s2>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[row], raw_tensor(path, "<s2>"))
    layers = lora_layers(pipe)
    assert len(layers) == 192
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    ff = f"{block}.ff.net.0.proj"
    assert "disney" in layers[f"unet.{ff}"].adapters
    assert weights.modules[("unet", ff)].down.shape == (1, 320)  # unet:4 is the GEGLU projection 320 → 2560
    assert torch.equal(weights.modules[("unet", ff)].up, raw_tensor(path, "unet:4:up"))
    assert torch.equal(weights.modules[("unet", f"{block}.attn2.to_k")].down, raw_tensor(path, "unet:6:down"))
    assert torch.equal(weights.modules[("text_encoder", "encoder.layers.0.self_attn.k_proj")].down,
                       raw_tensor(path, "text_encoder:0:down"))
    assert torch.equal(weights.modules[("text_encoder", "encoder.layers.11.self_attn.out_proj")].up,
                       raw_tensor(path, "text_encoder:47:up"))
    detach_lora(pipe, "disney")
    assert len(pipe.tokenizer) == vocabulary


def test_lokr_kron_has_each_layers_shape(pipe):
    path = fixture_file(LOKR)
    weights = load_lora(path)
    try:
        assert attach_lora(pipe, weights, "falcon") > 0
        layers = lora_layers(pipe)
        assert len(layers) == 350
        for (component, target), module in weights.modules.items():
            layer = layers[f"{component}.{target}"]
            adapter = layer.adapters["falcon"]
            assert adapter.delta_weight(layer.base.weight).shape == layer.base.weight.shape
            assert adapter.dense is None and adapter.kron is not None  # applied factored, never built
        attached_bytes = sum(t.numel() * t.element_size() for layer in layers.values()
                             for t in layer.adapters["falcon"].tensors())
        assert attached_bytes < 20e6  # the dense ΔWs would take 3.8 GB
        names = [n for n in layers if "downsamplers" in n or n.endswith(("conv1", "conv_shortcut", "to_k", "fc1",
                                                                         "proj_in"))]
        for name in names[::7]:  # applied factored == applied as the materialised ΔW, every kind of layer
            layer = layers[name]
            base = layer.base
            delta = layer.adapters["falcon"].delta_weight(base.weight)
            if isinstance(base, torch.nn.Conv2d):
                x = torch.randn(1, base.in_channels, 9, 11)
                want = base(x) + F.conv2d(x, delta, None, base.stride, base.padding, base.dilation)
            else:
                x = torch.randn(2, 3, base.in_features)
                want = base(x) + F.linear(x, delta)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)

        conv = "down_blocks.1.resnets.0.conv1"
        key = f"lora_unet_{conv.replace('.', '_')}"
        w1 = raw_tensor(path, f"{key}.lokr_w1_a") @ raw_tensor(path, f"{key}.lokr_w1_b")
        w2 = raw_tensor(path, f"{key}.lokr_w2_a") @ raw_tensor(path, f"{key}.lokr_w2_b")
        wrapped = pipe.unet.get_submodule(conv)
        expected_weight = wrapped.base.weight + torch.kron(w1, w2).reshape(wrapped.base.weight.shape)  # alpha = dim
        x = torch.randn(1, wrapped.base.in_channels, 16, 16)
        with torch.no_grad():
            reference = F.conv2d(x, expected_weight, wrapped.base.bias, padding=1)
            torch.testing.assert_close(wrapped(x), reference, atol=1e-4, rtol=1e-4)
    finally:
        del weights


def test_sd21_lora_is_refused_with_one_sentence(pipe):
    before = dict(pipe.unet.named_modules())
    with pytest.raises(LoraError) as error:
        attach_lora(pipe, fixture_file(SD21))
    assert str(error.value) == "sd21_lora_xattn1024.safetensors was made for SD2.x; this model is SD1.x."
    assert dict(pipe.unet.named_modules()) == before


def test_malformed_lora_is_refused_and_the_pipeline_stays_usable(pipe):
    attach_lora(pipe, fixture_file(BRAIN), "brain", weight=0.8)
    modules_before = dict(pipe.unet.named_modules())
    weight_before = pipe.unet.get_submodule(TO_K).weight.clone()
    with pytest.raises(LoraError, match=r"^timohavdk_new_bad_kohya\.safetensors is a malformed kohya LoRA"):
        attach_lora(pipe, fixture_file(MALFORMED))
    assert attached_adapters(pipe) == {"brain": 0.8}
    assert dict(pipe.unet.named_modules()) == modules_before
    assert torch.equal(pipe.unet.get_submodule(TO_K).weight, weight_before)
    with torch.no_grad():
        out = pipe.unet.get_submodule(TO_K)(torch.randn(1, 3, 768))
    assert torch.isfinite(out).all()
