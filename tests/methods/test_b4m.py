import pytest
import torch

from studio.compose import compose
from studio.errors import LoraError, PresetError
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


# --- Break-for-Make -------------------------------------------------------------------------------------------
def _random_trained(factors, seed, which):
    gen = torch.Generator().manual_seed(seed)
    for f in factors.values():
        if "B" in which:
            f.B = torch.randn(f.B.shape, generator=gen) * 0.1
        if "D" in which:
            f.D = torch.randn(f.D.shape, generator=gen) * 0.1
    return factors


def test_b4m_frozen_halves_come_from_the_seed(tiny_pipe):
    from studio.training.plp import create_plp_adapter

    one, two, other = (create_plp_adapter(tiny_pipe.unet, 4, s) for s in (7, 7, 8))
    assert set(one) == set(two) and len(one) > 10
    for name in one:
        assert torch.equal(one[name].A, two[name].A) and torch.equal(one[name].C, two[name].C)
    square = next(n for n, f in one.items() if f.A.shape[0] * 2 == f.C.shape[1] * 2 and f.A.abs().sum() > 0)
    assert not torch.equal(one[square].A, other[square].A)


def test_b4m_assembly_reproduces_the_block_formula(tiny_pipe, tmp_path):
    from studio.training.plp import assemble, create_plp_adapter, save_plp_adapter

    content = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 3), 1, "BD")
    style = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 3), 2, "BD")
    save_plp_adapter(tmp_path / "content.safetensors", content, "content", 3)
    save_plp_adapter(tmp_path / "style.safetensors", style, "style", 3)
    fused = assemble(tmp_path / "content.safetensors", tmp_path / "style.safetensors", tmp_path / "made.safetensors")
    for name, f in fused.items():
        A, C, Bs, Dc = content[name].A, content[name].C, style[name].B, content[name].D
        expected = torch.cat([torch.cat([A @ C, A @ Dc], 1), torch.cat([Bs @ C, Bs @ Dc], 1)], 0)
        assert torch.allclose(f.delta(), expected, atol=1e-6), name
    from studio.lora import load_lora

    made = load_lora(tmp_path / "made.safetensors")  # the assembly is one ordinary LoRA
    module = made.modules[("unet", name)]
    assert torch.allclose(module.delta_weight(), expected, atol=1e-6)


def test_b4m_refuses_mismatched_pairs_and_ordinary_loras(tiny_pipe, tiny_loras, tmp_path):
    from studio.training.plp import assemble, create_plp_adapter, save_plp_adapter

    save_plp_adapter(tmp_path / "c.safetensors", create_plp_adapter(tiny_pipe.unet, 4, 1), "content", 1)
    save_plp_adapter(tmp_path / "s.safetensors", create_plp_adapter(tiny_pipe.unet, 4, 2), "style", 2)
    with pytest.raises(LoraError, match="not created from the same seed"):
        assemble(tmp_path / "c.safetensors", tmp_path / "s.safetensors")
    with pytest.raises(LoraError, match="ordinary LoRA"):
        assemble(tiny_loras["alpha"], tmp_path / "s.safetensors")
    entries = [LoraEntry(file=str(tiny_loras["alpha"])), LoraEntry(file=str(tiny_loras["beta"]), role="style")]
    with pytest.raises(PresetError, match="ordinary LoRA"):
        compose(tiny_pipe, spec("b4m", entries))


def test_b4m_method_runs_the_assembled_adapter(tiny_pipe, tmp_path):
    from studio.training.plp import assemble, create_plp_adapter, save_plp_adapter

    content = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 5), 1, "BD")
    style = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 5), 2, "BD")
    save_plp_adapter(tmp_path / "c.safetensors", content, "content", 5)
    save_plp_adapter(tmp_path / "s.safetensors", style, "style", 5)
    assemble(tmp_path / "c.safetensors", tmp_path / "s.safetensors", tmp_path / "made.safetensors")
    entries = [LoraEntry(file=str(tmp_path / "c.safetensors")), LoraEntry(file=str(tmp_path / "s.safetensors"), role="style")]
    ours = compose(tiny_pipe, spec("b4m", entries)).latents
    merged = compose(tiny_pipe, spec("merge", [LoraEntry(file=str(tmp_path / "made.safetensors"))])).latents
    assert (ours - merged).abs().max() < 1e-5


def test_b4m_method_runs_a_made_adapter_as_it_is_and_refuses_it_beside_others(tiny_pipe, tmp_path):
    from studio.training.plp import assemble, create_plp_adapter, save_plp_adapter

    for role, seed in (("content", 1), ("style", 2)):
        save_plp_adapter(tmp_path / f"{role}.safetensors",
                         _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 5), seed, "BD"), role, 5)
    assemble(tmp_path / "content.safetensors", tmp_path / "style.safetensors", tmp_path / "made.safetensors")
    made = LoraEntry(file=str(tmp_path / "made.safetensors"))
    ours = compose(tiny_pipe, spec("b4m", [made], params={"weight": 0.5})).latents
    merged = compose(tiny_pipe, spec("merge", [made.model_copy(update={"weight": 0.5})])).latents
    assert (ours - merged).abs().max() < 1e-5
    with pytest.raises(PresetError, match="one B4M content adapter and one B4M style adapter, which it assembles, "
                                          "or one adapter made by `studio b4m make`"):
        compose(tiny_pipe, spec("b4m", [made, LoraEntry(file=str(tmp_path / "style.safetensors"), role="style")]))

