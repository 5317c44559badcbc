"""Every LoRA format, written here as small synthetic files shaped for a small UNet / CLIP text encoder
that use SD1.5's (and SDXL's) exact module names, then applied by the studio's injection and checked
numerically against the format's own definition of ΔW."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.architectures import SD15_UNET
from studio.errors import LoraError
from studio.lora import (
    LoraLayer,
    attach_lora,
    attached_adapters,
    detach_lora,
    inspect_lora,
    load_lora,
    lora_layers,
    only_adapters,
    set_lora_weights,
)
from studio.lora.cloneofsimo import candidate_orders
from studio.lora.inject import LoraLayer as InjectLayer

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
TO_Q = "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"
TO_OUT = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # a 1×1 Conv2d in SD1.5
CONV1 = "down_blocks.0.resnets.0.conv1"  # 3×3
DOWNSAMPLE = "down_blocks.0.downsamplers.0.conv"  # 3×3, stride 2
TIME_EMB = "up_blocks.2.resnets.1.time_emb_proj"
TE_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5 CLIPTextModel: no `text_model.` level
TE_FC1 = "encoder.layers.1.mlp.fc1"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


def tiny_sd1_pipe():
    """SD1.5's module names and cross-attention width (768) at a fraction of its size."""
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                down_block_types=SD15_UNET["down_block_types"], up_block_types=SD15_UNET["up_block_types"],
                                cross_attention_dim=768, attention_head_dim=8, sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77))
    return SimpleNamespace(unet=unet.eval(), text_encoder=text.eval())


def tiny_sdxl_pipe():
    """SDXL's block layout (LDM names map onto it) with two text encoders."""
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 2), cross_attention_dim=2048,
                                attention_head_dim=(2, 4, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=80, sample_size=8)
    config = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32)
    return SimpleNamespace(unet=unet.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**config)).eval(),
                           text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval())


def layer_of(pipe, component: str, path: str):
    module = getattr(pipe, component).get_submodule(path)
    return module.base if isinstance(module, LoraLayer) else module


def write(path, tensors: dict, metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def random_input(layer):
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8)
    return torch.randn(2, 3, layer.in_features)


def assert_applies(pipe, component: str, path: str, expected_delta: torch.Tensor, weight: float = 1.0):
    """The wrapped layer's output equals the base layer run with W + weight·ΔW."""
    wrapped = getattr(pipe, component).get_submodule(path)
    assert isinstance(wrapped, LoraLayer)
    base = wrapped.base
    x = random_input(base)
    new_weight = base.weight + weight * expected_delta.reshape(base.weight.shape)
    if isinstance(base, torch.nn.Conv2d):
        reference = F.conv2d(x, new_weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    else:
        reference = F.linear(x, new_weight, base.bias)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), reference, atol=1e-5, rtol=1e-5)


def low_rank(layer, rank: int, conv_kernel: bool = True):
    """(down, up) shaped as kohya saves them for `layer`."""
    if isinstance(layer, torch.nn.Conv2d):
        kernel = tuple(layer.kernel_size) if conv_kernel else (1, 1)
        return (torch.randn(rank, layer.in_channels, *kernel) * 0.1, torch.randn(layer.out_channels, rank, 1, 1) * 0.1)
    return torch.randn(rank, layer.in_features) * 0.1, torch.randn(layer.out_features, rank) * 0.1


def kohya_name(component: str, path: str) -> str:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_", "text_encoder_2": "lora_te2_text_model_"}
    return prefix[component] + path.replace(".", "_")


# --- kohya LoRA / LoCon --------------------------------------------------------------------------------------


def test_kohya_lora_and_locon_apply_alpha_over_rank(tmp_path):
    pipe = tiny_sd1_pipe()
    rank, alpha = 4, 2.0
    tensors, expected = {}, {}
    for component, path in [("unet", TO_K), ("unet", PROJ_IN), ("unet", CONV1), ("unet", TIME_EMB),
                            ("text_encoder", TE_Q), ("text_encoder", TE_FC1)]:
        down, up = low_rank(layer_of(pipe, component, path), rank)
        name = kohya_name(component, path)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        expected[(component, path)] = alpha / rank * (up.flatten(1) @ down.flatten(1))
    file = write(tmp_path / "locon.safetensors", tensors, {"ss_network_module": "networks.lora"})

    info = inspect_lora(file)
    assert (info.format, info.base_model, info.rank, info.alpha, info.modules) == ("kohya", "SD1.x", 4, 2.0, 6)
    assert info.has_text_encoder and info.components == {"unet": 4, "text_encoder": 2}

    injected = attach_lora(pipe, file, "locon", weight=0.7)
    assert injected == sum(t.numel() for t in tensors.values() if t.dim() > 0)
    for (component, path), delta in expected.items():
        assert_applies(pipe, component, path, delta, weight=0.7)


def test_locon_cp_middle_runs_with_the_layers_stride_and_padding(tmp_path):
    pipe = tiny_sd1_pipe()
    layer = layer_of(pipe, "unet", DOWNSAMPLE)
    assert layer.stride == (2, 2)
    down, up = low_rank(layer, 4, conv_kernel=False)
    mid = torch.randn(4, 4, 3, 3) * 0.1
    name = kohya_name("unet", DOWNSAMPLE)
    file = write(tmp_path / "locon_cp.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                                      f"{name}.lora_mid.weight": mid, f"{name}.alpha": torch.tensor(4.0)})
    weights = load_lora(file)
    attach_lora(pipe, weights, "cp")
    wrapped = pipe.unet.get_submodule(DOWNSAMPLE)
    x = torch.randn(1, layer.in_channels, 8, 8)
    hidden = F.conv2d(F.conv2d(x, down), mid, stride=layer.stride, padding=layer.padding)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), layer(x) + F.conv2d(hidden, up), atol=1e-5, rtol=1e-5)
    assert_applies(pipe, "unet", DOWNSAMPLE, weights.modules[("unet", DOWNSAMPLE)].delta_weight(layer.weight))


def test_kohya_without_alpha_has_scale_one(tmp_path):
    pipe = tiny_sd1_pipe()
    down, up = low_rank(layer_of(pipe, "unet", TO_Q), 8)
    name = kohya_name("unet", TO_Q)
    file = write(tmp_path / "noalpha.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    weights = load_lora(file)
    assert weights.modules[("unet", TO_Q)].scale == 1.0
    attach_lora(pipe, weights)
    assert_applies(pipe, "unet", TO_Q, up @ down)


# --- LyCORIS LoKr / LoHa -------------------------------------------------------------------------------------


def test_lokr_applies_the_kronecker_product(tmp_path):
    pipe = tiny_sd1_pipe()
    to_k = layer_of(pipe, "unet", TO_K)  # (32, 768) = kron((4, 32), (8, 24))
    conv = layer_of(pipe, "unet", CONV1)  # (32, 32, 3, 3): kron((4, 12), (8, 24)) reshaped, as in the fixture
    fc1 = layer_of(pipe, "text_encoder", TE_FC1)  # (37, 32): two full factors (37, 4) ⊗ (1, 8)
    dim, alpha = 2, 1.0
    k, c, f = kohya_name("unet", TO_K), kohya_name("unet", CONV1), kohya_name("text_encoder", TE_FC1)
    t = {f"{k}.lokr_w1": torch.randn(4, 32), f"{k}.lokr_w2_a": torch.randn(8, dim), f"{k}.lokr_w2_b": torch.randn(dim, 24),
         f"{k}.alpha": torch.tensor(alpha),
         f"{c}.lokr_w1_a": torch.randn(4, dim), f"{c}.lokr_w1_b": torch.randn(dim, 12),
         f"{c}.lokr_w2_a": torch.randn(8, dim), f"{c}.lokr_w2_b": torch.randn(dim, 24), f"{c}.alpha": torch.tensor(alpha),
         f"{f}.lokr_w1": torch.randn(37, 4), f"{f}.lokr_w2": torch.randn(1, 8), f"{f}.alpha": torch.tensor(alpha)}
    t = {key: v * 0.1 for key, v in t.items()}
    file = write(tmp_path / "lokr.safetensors", t)
    info = inspect_lora(file)
    assert (info.format, info.base_model, info.rank, info.modules) == ("lycoris_lokr", "SD1.x", 2, 3)

    attach_lora(pipe, file)
    scale = t[f"{k}.alpha"].item() / dim
    assert_applies(pipe, "unet", TO_K, scale * torch.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"]))
    kron = torch.kron(t[f"{c}.lokr_w1_a"] @ t[f"{c}.lokr_w1_b"], t[f"{c}.lokr_w2_a"] @ t[f"{c}.lokr_w2_b"])
    assert_applies(pipe, "unet", CONV1, scale * kron.reshape(conv.weight.shape))
    # both factors full: LyCORIS ignores alpha (scale 1)
    assert_applies(pipe, "text_encoder", TE_FC1, torch.kron(t[f"{f}.lokr_w1"], t[f"{f}.lokr_w2"]))
    assert fc1.weight.shape == (37, 32)


def test_lokr_tucker_factor_of_a_conv(tmp_path):
    pipe = tiny_sd1_pipe()
    conv = layer_of(pipe, "unet", CONV1)  # (32, 32, 3, 3) = kron((4, 4), (8, 8, 3, 3))
    c, dim = kohya_name("unet", CONV1), 2
    t = {f"{c}.lokr_w1": torch.randn(4, 4), f"{c}.lokr_t2": torch.randn(dim, dim, 3, 3),
         f"{c}.lokr_w2_a": torch.randn(dim, 8), f"{c}.lokr_w2_b": torch.randn(dim, 8), f"{c}.alpha": torch.tensor(1.0)}
    t = {key: v * 0.2 for key, v in t.items()}
    attach_lora(pipe, write(tmp_path / "lokr_cp.safetensors", t))
    # LyCORIS: w2[p, r, k, l] = Σ t2[i, j, k, l] · w2_a[i, p] · w2_b[j, r]
    w2 = torch.einsum("ijkl,ip,jr->prkl", t[f"{c}.lokr_t2"], t[f"{c}.lokr_w2_a"], t[f"{c}.lokr_w2_b"])
    w1 = t[f"{c}.lokr_w1"][:, :, None, None].contiguous()
    expected = torch.kron(w1, w2.contiguous()) * (t[f"{c}.alpha"].item() / dim)
    assert expected.shape == conv.weight.shape
    assert_applies(pipe, "unet", CONV1, expected)


def test_loha_applies_the_hadamard_product(tmp_path):
    pipe = tiny_sd1_pipe()
    rank, alpha = 4, 2.0
    tensors, expected = {}, {}
    for component, path in [("unet", TO_K), ("unet", CONV1), ("text_encoder", TE_Q)]:
        weight = layer_of(pipe, component, path).weight
        out, fan_in = weight.shape[0], weight[0].numel()
        name = kohya_name(component, path)
        parts = {p: torch.randn(*s) * 0.3 for p, s in [("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, fan_in)),
                                                       ("hada_w2_a", (out, rank)), ("hada_w2_b", (rank, fan_in))]}
        tensors |= {f"{name}.{p}": v for p, v in parts.items()} | {f"{name}.alpha": torch.tensor(alpha)}
        product = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        expected[(component, path)] = alpha / rank * product
    file = write(tmp_path / "loha.safetensors", tensors)
    assert inspect_lora(file).format == "lycoris_loha"
    attach_lora(pipe, file, weight=0.5)
    for (component, path), delta in expected.items():
        assert_applies(pipe, component, path, delta, weight=0.5)


# --- diffusers / PEFT, legacy attention processors ------------------------------------------------------------


def test_peft_keys_with_adapter_metadata_scale(tmp_path):
    pipe = tiny_sd1_pipe()
    (d1, u1), (d2, u2) = low_rank(layer_of(pipe, "unet", TO_OUT), 4), low_rank(layer_of(pipe, "text_encoder", TE_Q), 4)
    config = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
    file = write(tmp_path / "peft.safetensors", {
        f"unet.{TO_OUT}.lora_A.weight": d1, f"unet.{TO_OUT}.lora_B.weight": u1,
        f"text_encoder.text_model.{TE_Q}.lora_A.weight": d2, f"text_encoder.text_model.{TE_Q}.lora_B.weight": u2,
    }, {"lora_adapter_metadata": json.dumps(config)})
    info = inspect_lora(file)
    assert (info.format, info.alpha, info.has_text_encoder) == ("diffusers", 8.0, True)
    weights = load_lora(file)
    assert set(weights.modules) == {("unet", TO_OUT), ("text_encoder", TE_Q)}
    attach_lora(pipe, weights)
    assert_applies(pipe, "unet", TO_OUT, 2.0 * u1 @ d1)
    assert_applies(pipe, "text_encoder", TE_Q, 0.5 * u2 @ d2)


def test_diffusers_lora_down_up_keys(tmp_path):
    pipe = tiny_sd1_pipe()
    down, up = low_rank(layer_of(pipe, "unet", TO_K), 4)
    file = write(tmp_path / "old.safetensors", {f"unet.{TO_K}.lora.down.weight": down, f"unet.{TO_K}.lora.up.weight": up})
    assert inspect_lora(file).format == "diffusers"
    attach_lora(pipe, file)
    assert_applies(pipe, "unet", TO_K, up @ down)


def test_legacy_attention_processor_keys_are_converted(tmp_path):
    pipe = tiny_sd1_pipe()
    block = TO_OUT.removesuffix(".to_out.0")
    tensors, expected = {}, {}
    for proc, path in [("to_q_lora", f"{block}.to_q"), ("to_out_lora", TO_OUT)]:
        down, up = low_rank(layer_of(pipe, "unet", path), 4)
        tensors |= {f"{block}.processor.{proc}.down.weight": down, f"{block}.processor.{proc}.up.weight": up}
        expected[path] = up @ down
    file = write(tmp_path / "attnproc.safetensors", tensors)
    assert inspect_lora(file).format == "legacy_attn_procs"
    assert attach_lora(pipe, file) > 0
    assert set(lora_layers(pipe)) == {f"unet.{p}" for p in expected}
    for path, delta in expected.items():
        assert_applies(pipe, "unet", path, delta)


# --- DoRA ------------------------------------------------------------------------------------------------------


def test_dora_magnitudes_are_applied(tmp_path):
    pipe = tiny_sd1_pipe()
    q, k = layer_of(pipe, "unet", TO_Q), layer_of(pipe, "unet", TO_K)
    (dq, uq), (dk, uk) = low_rank(q, 4), low_rank(k, 4)
    per_output = q.weight.norm(dim=1) * 1.1  # PEFT lora_magnitude_vector: one per output row
    per_input = k.weight.norm(dim=0, keepdim=True) * 0.9  # LyCORIS dora_scale (1, in): one per input column
    nq, nk = kohya_name("unet", TO_Q), kohya_name("unet", TO_K)
    file = write(tmp_path / "dora.safetensors", {
        f"{nq}.lora_down.weight": dq, f"{nq}.lora_up.weight": uq, f"{nq}.alpha": torch.tensor(4.0),
        f"{nk}.lora_down.weight": dk, f"{nk}.lora_up.weight": uk, f"{nk}.alpha": torch.tensor(4.0),
        f"{nk}.dora_scale": per_input})
    peft_file = write(tmp_path / "dora_peft.safetensors", {
        f"unet.{TO_Q}.lora_A.weight": dq, f"unet.{TO_Q}.lora_B.weight": uq,
        f"unet.{TO_Q}.lora_magnitude_vector.weight": per_output})
    assert inspect_lora(file).dora and inspect_lora(peft_file).dora

    attach_lora(pipe, file, "lycoris")
    merged_k = k.weight + uk @ dk
    assert_applies(pipe, "unet", TO_K, merged_k * (per_input / merged_k.norm(dim=0, keepdim=True)) - k.weight)
    assert_applies(pipe, "unet", TO_Q, uq @ dq)  # no magnitude on this module: plain LoRA
    detach_lora(pipe, "lycoris")
    attach_lora(pipe, peft_file, "peft")
    merged_q = q.weight + uq @ dq
    assert_applies(pipe, "unet", TO_Q, merged_q * (per_output / merged_q.norm(dim=1))[:, None] - q.weight)


# --- cloneofsimo -----------------------------------------------------------------------------------------------


def _cloneofsimo_file(path, layers, component="unet"):
    tensors = {}
    for i, (_, fan_in, fan_out) in enumerate(layers):
        tensors[f"{component}:{i}:down"] = torch.randn(1, fan_in)
        tensors[f"{component}:{i}:up"] = torch.randn(fan_out, 1)
    classes = ["CrossAttention", "Attention", "GEGLU"] if component == "unet" else ["CLIPAttention"]
    metadata = {component: json.dumps(classes)}
    return write(path, tensors, metadata)


def test_cloneofsimo_order_is_recovered_from_the_layer_shapes(tmp_path):
    current, legacy = candidate_orders("unet", ("CrossAttention", "Attention", "GEGLU"))
    assert len(current) == len(legacy) == 144
    # old diffusers: attn1, ff, attn2 inside each transformer block; the mid block comes after the up blocks
    assert [p.rsplit("transformer_blocks.0.", 1)[1] for p, _, _ in legacy[:9]] == [
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    assert legacy[-1][0] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    for order in (legacy, current):
        weights = load_lora(_cloneofsimo_file(tmp_path / "c.safetensors", order))
        assert [target for _, target in weights.modules] == [path for path, _, _ in order]
        assert all(m.scale == 1.0 for m in weights.modules.values())


def test_cloneofsimo_with_an_unknown_order_is_refused(tmp_path):
    legacy = candidate_orders("unet", ("CrossAttention", "Attention", "GEGLU"))[1]
    shuffled = legacy[1:] + legacy[:1]
    with pytest.raises(LoraError, match="unsupported format"):
        load_lora(_cloneofsimo_file(tmp_path / "bad.safetensors", shuffled))
    sd2 = [(p, 1024 if i == 768 else i, o) for p, i, o in legacy]
    with pytest.raises(LoraError, match=r"made for SD2\.x.*unsupported"):
        load_lora(_cloneofsimo_file(tmp_path / "sd2.safetensors", sd2))


# --- SDXL naming ---------------------------------------------------------------------------------------------


def test_sdxl_kohya_ldm_names_and_two_text_encoders(tmp_path):
    pipe = tiny_sdxl_pipe()
    placements = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
            ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in"),
        "lora_unet_output_blocks_0_0_in_layers_2": ("unet", "up_blocks.0.resnets.0.conv1"),
        "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
    }
    tensors, expected = {}, {}
    for name, (component, path) in placements.items():
        down, up = low_rank(layer_of(pipe, component, path), 2)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        expected[(component, path)] = 0.5 * (up.flatten(1) @ down.flatten(1))
    file = write(tmp_path / "xl.safetensors", tensors)
    assert inspect_lora(file).base_model == "SDXL"
    weights = load_lora(file)
    assert set(weights.modules) == set(expected)
    attach_lora(pipe, weights)
    for (component, path), delta in expected.items():
        assert_applies(pipe, component, path, delta)


# --- attach / detach semantics ---------------------------------------------------------------------------------


def _simple_lora(tmp_path, pipe, name="simple", paths=(TO_K, TO_Q)):
    tensors = {}
    for path in paths:
        down, up = low_rank(layer_of(pipe, "unet", path), 4)
        tensors |= {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up}
    return write(tmp_path / f"{name}.safetensors", tensors)


def _snapshot(pipe):
    return {name: module for name, module in pipe.unet.named_modules()}, attached_adapters(pipe)


def test_other_base_is_refused_before_touching_the_pipeline(tmp_path):
    pipe = tiny_sd1_pipe()
    down, up = torch.randn(4, 1024), torch.randn(32, 4)
    file = write(tmp_path / "sd2.safetensors", {f"unet.{TO_K}.lora_A.weight": down, f"unet.{TO_K}.lora_B.weight": up})
    before = _snapshot(pipe)
    with pytest.raises(LoraError) as error:
        attach_lora(pipe, file)
    assert str(error.value) == "sd2.safetensors was made for SD2.x; this model is SD1.x."
    assert _snapshot(pipe) == before


def test_a_shape_mismatch_leaves_the_pipeline_exactly_as_it_was(tmp_path):
    pipe = tiny_sd1_pipe()
    attach_lora(pipe, _simple_lora(tmp_path, pipe, "first"), weight=0.3)
    before_modules, before_adapters = _snapshot(pipe)
    weight_before = layer_of(pipe, "unet", TO_K).weight.clone()
    good_down, good_up = low_rank(layer_of(pipe, "unet", TO_OUT), 4)
    bad = write(tmp_path / "bad.safetensors", {
        f"unet.{TO_OUT}.lora_A.weight": good_down, f"unet.{TO_OUT}.lora_B.weight": good_up,
        f"unet.{CONV1}.lora_A.weight": torch.randn(4, 7), f"unet.{CONV1}.lora_B.weight": torch.randn(32, 4)})
    with pytest.raises(LoraError, match=r"bad\.safetensors: unet\.down_blocks\.0\.resnets\.0\.conv1 does not fit"):
        attach_lora(pipe, bad)
    missing = write(tmp_path / "missing.safetensors", {"unet.no_such.layer.lora_A.weight": torch.randn(4, 8),
                                                       "unet.no_such.layer.lora_B.weight": torch.randn(8, 4)})
    with pytest.raises(LoraError, match="missing.safetensors targets unet.no_such.layer, which this model does not have"):
        attach_lora(pipe, missing)
    assert _snapshot(pipe) == (before_modules, before_adapters) == (before_modules, {"first": 0.3})
    assert torch.equal(layer_of(pipe, "unet", TO_K).weight, weight_before)


def test_a_failure_while_wrapping_is_rolled_back(tmp_path, monkeypatch):
    pipe = tiny_sd1_pipe()
    attach_lora(pipe, _simple_lora(tmp_path, pipe, "first"), weight=0.3)
    before = _snapshot(pipe)
    calls = []

    def failing_add(self, name, module, weight):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        self.adapters[name] = module
        self.weights[name] = weight

    monkeypatch.setattr(InjectLayer, "add_adapter", failing_add)
    with pytest.raises(LoraError, match="could not be attached.*left unchanged"):
        attach_lora(pipe, _simple_lora(tmp_path, pipe, "second", paths=(TO_K, TO_OUT, CONV1, TO_Q)))
    assert len(calls) == 3
    assert _snapshot(pipe) == before
    assert all(set(layer.adapters) == {"first"} for layer in lora_layers(pipe).values())


def test_wrapped_model_saves_loads_and_unwraps_like_the_original(tmp_path):
    pipe = tiny_sd1_pipe()
    original = pipe.unet.state_dict()
    modules_before = dict(pipe.unet.named_modules())
    attach_lora(pipe, _simple_lora(tmp_path, pipe, "a"))
    attach_lora(pipe, _simple_lora(tmp_path, pipe, "b", paths=(TO_K,)))
    assert pipe.unet.get_submodule(TO_K).weight is modules_before[TO_K].weight  # attributes reach the base
    wrapped_state = pipe.unet.state_dict()
    assert list(wrapped_state) == list(original)
    assert all(torch.equal(wrapped_state[k], original[k]) for k in original)
    pipe.unet.load_state_dict(original)
    pipe.unet.save_pretrained(tmp_path / "saved")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(reloaded.state_dict()[k], original[k]) for k in original)

    detach_lora(pipe, "a")
    assert set(lora_layers(pipe)) == {f"unet.{TO_K}"}
    detach_lora(pipe, "b")
    assert dict(pipe.unet.named_modules()) == modules_before
    with pytest.raises(LoraError, match="No adapter named 'b'"):
        detach_lora(pipe, "b")


def test_weights_overrides_and_gates(tmp_path):
    pipe = tiny_sd1_pipe()
    a, b = load_lora(_simple_lora(tmp_path, pipe, "a")), load_lora(_simple_lora(tmp_path, pipe, "b"))
    attach_lora(pipe, a, weight=1.0)
    attach_lora(pipe, b, weight=0.5)
    delta_a = a.modules[("unet", TO_K)].delta_weight()
    delta_b = b.modules[("unet", TO_K)].delta_weight()
    assert_applies(pipe, "unet", TO_K, delta_a + 0.5 * delta_b)
    set_lora_weights(pipe, {"a": 0.25, "b": 0.0})
    assert attached_adapters(pipe) == {"a": 0.25, "b": 0.0}
    assert_applies(pipe, "unet", TO_K, 0.25 * delta_a)
    set_lora_weights(pipe, {"b": 2.0})
    with only_adapters(pipe, ["b"]):
        assert_applies(pipe, "unet", TO_K, 2.0 * delta_b)
    with only_adapters(lora_layers(pipe), []):
        assert_applies(pipe, "unet", TO_K, torch.zeros_like(delta_a))
    assert all(layer.override is None for layer in lora_layers(pipe).values())

    layer = pipe.unet.get_submodule(TO_K)
    x = torch.randn(1, 4, layer.in_features)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])[None, :, None]  # adapter "a" only on tokens 0 and 2
    seen = []
    layer.gate = lambda name, delta: seen.append(delta.shape) or (mask if name == "a" else None)
    with torch.no_grad():
        expected = layer.base(x) + 0.25 * F.linear(x, delta_a) * mask + 2.0 * F.linear(x, delta_b)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    rank = a.modules[("unet", TO_K)].down.shape[0]
    assert seen == [(1, 4, rank)] * 2  # the gate sees each adapter's low-rank hidden: its batch and token axes
    layer.gate = None
    with only_adapters([layer, layer.base], ["a"]):  # modules that are not LoraLayers are ignored
        assert_applies(pipe, "unet", TO_K, 0.25 * delta_a)
    with pytest.raises(LoraError, match="No adapter named 'c'"):
        set_lora_weights(pipe, {"c": 1.0})
    with pytest.raises(LoraError, match="already attached"):
        attach_lora(pipe, a)


def test_nothing_to_inject_is_an_error(tmp_path):
    pipe = tiny_sd1_pipe()
    weights = load_lora(_simple_lora(tmp_path, pipe))
    weights.modules.clear()
    with pytest.raises(LoraError, match="no layer to inject"):
        attach_lora(pipe, weights)


def test_peft_state_dict_folds_scale_and_cp_middle(tmp_path):
    pipe = tiny_sd1_pipe()
    down, up = low_rank(layer_of(pipe, "unet", TO_K), 4)
    cp_down, cp_up = low_rank(layer_of(pipe, "unet", CONV1), 4, conv_kernel=False)
    mid = torch.randn(4, 4, 3, 3)
    k, c = kohya_name("unet", TO_K), kohya_name("unet", CONV1)
    weights = load_lora(write(tmp_path / "k.safetensors", {
        f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(2.0),
        f"{c}.lora_down.weight": cp_down, f"{c}.lora_up.weight": cp_up, f"{c}.lora_mid.weight": mid}))
    state = weights.to_peft_state_dict()
    assert set(state) == {f"unet.{TO_K}.lora_A.weight", f"unet.{TO_K}.lora_B.weight",
                          f"unet.{CONV1}.lora_A.weight", f"unet.{CONV1}.lora_B.weight"}
    torch.testing.assert_close(state[f"unet.{TO_K}.lora_B.weight"] @ state[f"unet.{TO_K}.lora_A.weight"], 0.5 * up @ down)
    folded = state[f"unet.{CONV1}.lora_B.weight"].flatten(1) @ state[f"unet.{CONV1}.lora_A.weight"].flatten(1)
    torch.testing.assert_close(folded.reshape(32, 32, 3, 3), weights.modules[("unet", CONV1)].delta_weight())

    lokr = write(tmp_path / "lokr.safetensors", {f"{k}.lokr_w1": torch.randn(4, 32), f"{k}.lokr_w2": torch.randn(8, 24)})
    with pytest.raises(LoraError, match="PEFT cannot load"):
        load_lora(lokr).to_peft_state_dict()


# --- pickles -----------------------------------------------------------------------------------------------------


def test_pickles_are_refused_unless_opted_in(tmp_path):
    pipe = tiny_sd1_pipe()
    down, up = low_rank(layer_of(pipe, "unet", TO_K), 4)
    name = kohya_name("unet", TO_K)
    file = tmp_path / "old.pt"
    torch.save({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(8.0)}, file)
    for refuse in (lambda: load_lora(file), lambda: inspect_lora(file), lambda: attach_lora(pipe, file)):
        with pytest.raises(LoraError, match=r"old\.pt is a pickled file .* can execute code"):
            refuse()
    assert lora_layers(pipe) == {}

    weights = load_lora(file, allow_pickle=True)
    assert (weights.info.format, weights.info.alpha, weights.info.short_hash) == ("kohya", 8.0, None)
    attach_lora(pipe, weights)
    assert_applies(pipe, "unet", TO_K, 2.0 * up @ down)

    code = tmp_path / "code.pt"
    torch.save({"payload": SimpleNamespace(x=1)}, code)
    with pytest.raises(LoraError, match=r"would import types\.SimpleNamespace, which is code, so it is never loaded"):
        load_lora(code, allow_pickle=True)


# --- inspection ----------------------------------------------------------------------------------------------


def _to_k_file(path, width=768, metadata=None):
    down, up = torch.randn(4, width), torch.randn(32, 4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return write(path, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(1.0, dtype=torch.bfloat16)}, metadata)


@pytest.mark.parametrize("metadata, base", [
    ({"ss_base_model_version": "sd_v1"}, "SD1.x"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "SD2.x"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"ss_base_model_version": "shapes_world_v1"}, "shapes-world"),
    ({"ss_v2": "True"}, "SD2.x"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "SDXL"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "SD2.x"),
])
def test_base_model_from_metadata_wins_over_shapes(tmp_path, metadata, base):
    assert inspect_lora(_to_k_file(tmp_path / "m.safetensors", 768, metadata)).base_model == base


@pytest.mark.parametrize("width, base", [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL"), (128, "shapes-world"),
                                         (512, None)])
def test_base_model_from_the_cross_attention_width(tmp_path, width, base):
    info = inspect_lora(_to_k_file(tmp_path / "w.safetensors", width))
    assert info.base_model == base
    assert info.alpha == 1.0  # a bf16 scalar, read from the file without loading tensors
    assert (info.problems != []) == (base is None)


def test_a_lora_for_the_shapes_world_is_refused_on_sd1(tmp_path):
    pipe = tiny_sd1_pipe()
    file = _to_k_file(tmp_path / "shapes.safetensors", 768, {"ss_base_model_version": "shapes_world_v1"})
    with pytest.raises(LoraError, match=r"^shapes\.safetensors was made for shapes-world; this model is SD1\.x\.$"):
        attach_lora(pipe, file)
    assert lora_layers(pipe) == {}


def test_trigger_words_title_and_json(tmp_path):
    tags = {"10_hero": {"hero_tok": 30, "red cape": 12, "1girl": 25}, "5_more": {"red cape": 20, "sky": 1}}
    file = _to_k_file(tmp_path / "hero.safetensors", 768, {
        "ss_trigger_words": json.dumps(["hero_tok"]), "modelspec.trigger_phrase": "heroic pose, hero_tok",
        "ss_tag_frequency": json.dumps(tags), "ss_output_name": "hero_v2", "modelspec.title": "Hero"})
    info = inspect_lora(file)
    assert info.trigger_words == ["hero_tok", "heroic pose", "red cape", "1girl", "sky"]
    assert info.title == "Hero"
    data = json.loads(json.dumps(info.to_json()))
    assert {"format", "base_model", "rank", "alpha", "modules", "has_text_encoder", "trigger_words", "sha256",
            "model_hash", "short_hash", "path", "name", "dora", "title", "problems"} <= set(data)
    assert "metadata" not in data and "hero_tok" in info.summary()


def _raw_file(path, payload: bytes):
    path.write_bytes(payload)
    return path


def _header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    return _raw_file(path, len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("make, problem", [
    (lambda p: _raw_file(p, b""), "not a safetensors file"),
    (lambda p: _raw_file(p, b"PK\x03\x04 this is a zip archive, not safetensors"), "zip archive"),
    (lambda p: _raw_file(p, b"\x00" * 8 + b"{}"), "header length"),
    (lambda p: _raw_file(p, (200).to_bytes(8, "little") + b"{"), "truncated"),
    (lambda p: _raw_file(p, (5).to_bytes(8, "little") + b"nope!"), "corrupt safetensors header"),
    (lambda p: _header_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), "truncated"),
    (lambda p: _header_file(p, {"emb_params": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not a LoRA this studio recognises"),
    (lambda p: write(p, {"model.diffusion_model.out.0.weight": torch.zeros(2)}), "full Stable Diffusion checkpoint"),
    (lambda p: write(p, {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2)}),
     "transformer-based model"),
    (lambda p: write(p, {"lora_unet_unet_down_blocks_0_attn1_to_k_lora_down.weight": torch.zeros(2, 2)}),
     "malformed kohya LoRA"),
    (lambda p: write(p, {"lora_unet_down_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(2, 2)}),
     "incomplete kohya LoRA"),
    (lambda p: write(p, {"lora_unet_down_blocks_0_attn1_to_k.on_input": torch.zeros(2)}), "unsupported part"),
    (lambda p: write(p, {f"unet.{TO_K}.lora_A.weight": torch.zeros(2, 2)}), "incomplete diffusers LoRA"),
])
def test_unusable_files_get_one_sentence_naming_the_file(tmp_path, make, problem):
    file = make(tmp_path / "thing.safetensors")
    with pytest.raises(LoraError) as error:
        inspect_lora(file)
    message = str(error.value)
    assert message.startswith("thing.safetensors ") and problem in message
    assert message.endswith(".") and "\n" not in message
