import re

import pytest
import torch

from studio.errors import LoraError, StudioError


def _shapes_world_pair(pipe, tmp_path):
    from studio.training.b4m import BreakConfig, break_train

    content = break_train(pipe, BreakConfig("content", "concept", "cross", "ohwx", seed=3, rank=2, steps=1,
                                            batch_size=2, embedding=True), tmp_path / "c.safetensors", progress=False)
    style = break_train(pipe, BreakConfig("style", "style", "sepia", "sepx", seed=3, rank=2, steps=1, batch_size=2,
                                          embedding=True, trigger_after_noun=True), tmp_path / "s.safetensors",
                        progress=False)
    return content, style


def test_b4m_break_trains_only_the_learnable_halves_and_restores_the_unet(tiny_pipe, tmp_path):
    from studio.training.b4m import BreakConfig, break_train
    from studio.training.plp import PLPLinear, create_plp_adapter, read_plp_adapter

    cfg = BreakConfig("content", "concept", "crescent", "sks", seed=3, rank=2, steps=2, batch_size=2)
    factors, meta = read_plp_adapter(break_train(tiny_pipe, cfg, tmp_path / "c.safetensors", progress=False))
    fresh = create_plp_adapter(tiny_pipe.unet, 2, 3)
    assert meta["b4m_role"] == "content" and set(factors) == set(fresh)
    for name, f in factors.items():
        assert torch.allclose(f.A, fresh[name].A) and torch.allclose(f.C, fresh[name].C)
    assert any(f.D.abs().sum() > 0 for f in factors.values())  # content learns D (and B at the aux rate)
    assert not any(isinstance(m, PLPLinear) for m in tiny_pipe.unet.modules())


def test_b4m_style_with_its_trigger_after_the_noun_records_it_and_its_rates(tiny_pipe, tmp_path, monkeypatch):
    import json as _json

    import studio.training.b4m as b4m
    from studio.lora import inspect_lora
    from studio.training.b4m import BreakConfig, break_train

    captions, rates = [], []
    real_train = b4m._train_plp

    def spy(pipe, factors, batch_for_step, lr_B, lr_D, *args, **kwargs):
        import random as _random

        captions.extend(batch_for_step(_random.Random(0), 0, 4)[1])
        rates.append((lr_B, lr_D))
        return real_train(pipe, factors, batch_for_step, lr_B, lr_D, *args, **kwargs)

    monkeypatch.setattr(b4m, "_train_plp", spy)
    cfg = BreakConfig("style", "style", "sepia", "sepx", seed=3, rank=2, steps=1, batch_size=2, main_lr=5e-4,
                      aux_lr=2e-5, trigger_after_noun=True)
    path = break_train(tiny_pipe, cfg, tmp_path / "s.safetensors", progress=False)
    assert rates == [(5e-4, 2e-5)]  # a style adapter learns B at the main rate
    styled = [c for c in captions if "sepx" in c]  # the main half: every object in the palette
    assert styled and all(re.search(r"(circle|square|triangle|star|heart) sepx (on|in) ", c) for c in styled)
    recorded = _json.loads(inspect_lora(path).metadata["studio_b4m_config"])
    assert recorded["trigger_after_noun"] is True and recorded["main_lr"] == 5e-4


def test_b4m_content_learns_beside_auxiliary_styles_in_turn(tiny_pipe, tmp_path, monkeypatch):
    import json as _json
    import random as _random

    import studio.training.b4m as b4m
    from studio.lora import inspect_lora
    from studio.training.b4m import BreakConfig, break_train

    batches = []
    real_train = b4m._train_plp

    def spy(pipe, factors, batch_for_step, *args, **kwargs):
        batches.extend(batch_for_step(_random.Random(0), step, 4)[1] for step in range(2))
        return real_train(pipe, factors, batch_for_step, *args, **kwargs)

    monkeypatch.setattr(b4m, "_train_plp", spy)
    cfg = BreakConfig("content", "concept", "cross", "ohwx", seed=3, rank=2, steps=1, batch_size=2,
                      aux_styles=("cyanotype", "checkered"))
    path = break_train(tiny_pipe, cfg, tmp_path / "c.safetensors", progress=False)
    step0, step1 = batches
    assert all("ohwx" in c for c in step0[0::2]) and all("ohwx" in c for c in step1[0::2])  # the main half
    # the auxiliary half: every object in step 0's style, then step 1's
    assert all(c.count("cyanotype") == c.count(" a ") + c.startswith("a ") for c in step0[1::2])
    assert all(c.count("checkered") == c.count(" a ") + c.startswith("a ") for c in step1[1::2])
    assert _json.loads(inspect_lora(path).metadata["studio_b4m_config"])["aux_styles"] == ["cyanotype", "checkered"]


@pytest.mark.parametrize("main", [True, False])
def test_b4m_split_sets_teach_each_half_only_from_its_own_images(tiny_pipe, main):

    from studio.toyworld.render import random_scene
    from studio.training.b4m import _train_plp
    from studio.training.datasets import render_batch
    from studio.training.plp import create_plp_adapter

    def batch_for_step(rng, step, n):  # every image main, or none
        return (*render_batch([random_scene(rng) for _ in range(n)], rng), [main] * n)

    trained, _ = _train_plp(tiny_pipe, create_plp_adapter(tiny_pipe.unet, 2, 3), batch_for_step, 1e-3, 1e-3, 2, 2,
                            0, "split", False, main_half="D")
    B_moved = any(f.B.abs().sum() > 0 for f in trained.values())
    D_moved = any(f.D.abs().sum() > 0 for f in trained.values())
    assert (D_moved, B_moved) == ((True, False) if main else (False, True))


@pytest.mark.parametrize("role, aux, message", [
    ("style", ("cyanotype",), "a style adapter's auxiliary sets are plain contents"),
    ("content", ("teal",), "Unknown auxiliary style 'teal'"),
])
def test_b4m_break_refuses_wrong_auxiliary_styles(tiny_pipe, tmp_path, role, aux, message):
    from studio.training.b4m import BreakConfig, break_train

    kind, subject = ("style", "sepia") if role == "style" else ("concept", "cross")
    cfg = BreakConfig(role, kind, subject, "ohwx", seed=3, rank=2, steps=1, batch_size=2, aux_styles=aux)
    with pytest.raises(StudioError, match=message):
        break_train(tiny_pipe, cfg, tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_b4m_break_refuses_an_unknown_subject_before_training(tiny_pipe, tmp_path):
    from studio.training.b4m import BreakConfig, break_train
    from studio.training.plp import PLPLinear

    cfg = BreakConfig("style", "style", "teal", "tl", seed=3, rank=2, steps=2, batch_size=2)
    with pytest.raises(StudioError, match="Unknown texture or palette 'teal'"):
        break_train(tiny_pipe, cfg, tmp_path / "s.safetensors", progress=False)
    assert not (tmp_path / "s.safetensors").exists()
    assert not any(isinstance(m, PLPLinear) for m in tiny_pipe.unet.modules())


def test_b4m_break_on_a_folder_of_images_with_captions(tiny_pipe, tmp_path):
    import random as _random

    from studio.errors import StudioError
    from studio.toyworld.render import random_scene, render
    from studio.training.b4m import break_train_folders
    from studio.training.datasets import ImageFolder
    from studio.training.plp import create_plp_adapter, read_plp_adapter

    folder, aux = tmp_path / "content", tmp_path / "aux"
    folder.mkdir()
    aux.mkdir()
    rng = _random.Random(0)
    for i in range(3):
        scene = random_scene(rng)
        render(scene, i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(scene.caption())
        render(random_scene(rng), i).save(aux / f"{i}.jpg")
    with pytest.raises(StudioError, match="no caption file"):
        ImageFolder(aux, 64)
    path = break_train_folders(tiny_pipe, "content", ImageFolder(folder, 64), [ImageFolder(aux, 64, "shapes")],
                               tmp_path / "c.safetensors", seed=4, rank=2, steps=2, progress=False)
    factors, meta = read_plp_adapter(path)
    fresh = create_plp_adapter(tiny_pipe.unet, 2, 4)
    assert meta["b4m_role"] == "content" and meta["ss_base_model_version"] == "shapes_world_v1"
    assert all(torch.allclose(f.A, fresh[n].A) and torch.allclose(f.C, fresh[n].C) for n, f in factors.items())
    assert any(f.D.abs().sum() > 0 for f in factors.values())
    # split sets and no auxiliary set: only the content's half learns
    split = break_train_folders(tiny_pipe, "content", ImageFolder(folder, 64), [], tmp_path / "split.safetensors",
                                seed=4, rank=2, steps=2, progress=False, split_sets=True)
    factors, _ = read_plp_adapter(split)
    assert all(f.B.abs().sum() == 0 for f in factors.values()) and any(f.D.abs().sum() > 0 for f in factors.values())


def test_b4m_make_refuses_to_fine_tune_a_pair_on_another_base_model(tiny_pipe, sd15_pipe, tmp_path):
    from studio.training.b4m import make
    from studio.training.plp import PLPLinear

    content, style = _shapes_world_pair(tiny_pipe, tmp_path)
    with pytest.raises(LoraError, match=r"^c\.safetensors was made for shapes-world; this model is SD1\.x\.$"):
        make(sd15_pipe, content, style, tmp_path / "made.safetensors", finetune_steps=1)
    assert not (tmp_path / "made.safetensors").exists()
    assert not any(isinstance(m, PLPLinear) for m in sd15_pipe.unet.modules())


def test_b4m_make_fine_tunes_both_learnable_halves_of_the_assembly_and_keeps_the_frozen_ones(tiny_pipe, tmp_path):
    from studio.lora import load_lora
    from studio.training.b4m import make
    from studio.training.plp import PLPLinear, assemble, read_plp_adapter

    content, style = _shapes_world_pair(tiny_pipe, tmp_path)
    plain = assemble(content, style)
    tuned, meta = read_plp_adapter(make(tiny_pipe, content, style, tmp_path / "made.safetensors", finetune_steps=2,
                                        lr=1e-3, progress=False))
    assert meta["b4m_role"] == "assembled" and meta["b4m_finetune_steps"] == "2"
    assert meta["ss_base_model_version"] == "shapes_world_v1" and meta["b4m_content"] == "c.safetensors"
    for name, f in tuned.items():
        assert torch.equal(f.A, plain[name].A) and torch.equal(f.C, plain[name].C)
    assert any(not torch.equal(f.B, plain[n].B) for n, f in tuned.items())
    assert any(not torch.equal(f.D, plain[n].D) for n, f in tuned.items())
    assert set(load_lora(tmp_path / "made.safetensors").embeddings) == {"ohwx", "sepx"}  # both words come along
    assert not any(isinstance(m, PLPLinear) for m in tiny_pipe.unet.modules())
    assert "ohwx" not in tiny_pipe.tokenizer.get_vocab()  # the words were in the tokenizer only while it trained


def test_b4m_make_fine_tunes_adapters_trained_on_folders_only_with_their_images(tiny_pipe, tmp_path):
    import random as _random

    from studio.toyworld.render import random_scene, render
    from studio.training.b4m import break_train_folders, make
    from studio.training.datasets import ImageFolder

    folders = {}
    for role in ("content", "style"):
        folders[role] = tmp_path / role
        folders[role].mkdir()
        rng = _random.Random(len(role))
        for i in range(2):
            scene = random_scene(rng)
            render(scene, i).save(folders[role] / f"{i}.png")
            (folders[role] / f"{i}.txt").write_text(scene.caption())
    paths = {role: break_train_folders(tiny_pipe, role, ImageFolder(folder, 64, None), [],
                                       tmp_path / f"{role}.safetensors", seed=4, rank=2, steps=1, progress=False)
             for role, folder in folders.items()}
    with pytest.raises(LoraError, match=r"^content.safetensors was trained on your own images, so the joint "
                                        r"fine-tune needs them again"):
        make(tiny_pipe, paths["content"], paths["style"], tmp_path / "made.safetensors", finetune_steps=1)
    with pytest.raises(LoraError, match="needs both folders"):
        make(tiny_pipe, paths["content"], paths["style"], tmp_path / "made.safetensors", finetune_steps=1,
             content_images=folders["content"])
    assert not (tmp_path / "made.safetensors").exists()
    made = make(tiny_pipe, paths["content"], paths["style"], tmp_path / "made.safetensors", finetune_steps=1,
                content_images=folders["content"], style_images=folders["style"], progress=False)
    assert made.exists()

