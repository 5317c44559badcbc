"""The peers' baselines (merge, switch, composite), DECOR and Break-for-Make (issue 6)."""
import re

import pytest
import torch

from studio.compose import compose, prepared_session
from studio.errors import LoraError, PresetError
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


def test_merge_is_the_exact_sum_of_deltas_in_every_layer(tiny_pipe, tiny_loras):
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora, lora_layers

    a, b = load_lora(tiny_loras["alpha"]), load_lora(tiny_loras["beta"])
    attach_lora(tiny_pipe, a, "a", 0.7)
    attach_lora(tiny_pipe, b, "b", -0.4)
    try:
        for name, layer in list(lora_layers(tiny_pipe).items())[:40]:
            component, _, target = name.partition(".")
            weight = layer.base.weight
            expected = weight.clone()
            for lora, w in ((a, 0.7), (b, -0.4)):
                module = lora.modules.get((component, target))
                if module is not None:
                    expected += w * module.delta_weight(weight)
            if isinstance(layer.base, torch.nn.Linear):
                x = torch.randn(3, weight.shape[1])
                want = torch.nn.functional.linear(x, expected, layer.base.bias)
            else:
                x = torch.randn(1, weight.shape[1], 6, 6)
                want = torch.nn.functional.conv2d(x, expected, layer.base.bias, layer.base.stride, layer.base.padding)
            assert torch.allclose(layer(x), want, atol=1e-5), name
    finally:
        detach_lora(tiny_pipe, "a")
        detach_lora(tiny_pipe, "b")


def test_merge_equals_diffusers_set_adapters(tiny_pipe, tiny_loras):
    from studio.lora import load_lora

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), weight=0.7), LoraEntry(file=str(tiny_loras["beta"]), weight=0.5)]
    ours = compose(tiny_pipe, spec("merge", entries)).latents
    tiny_pipe.load_lora_weights(load_lora(tiny_loras["alpha"]).to_peft_state_dict(), adapter_name="a")
    tiny_pipe.load_lora_weights(load_lora(tiny_loras["beta"]).to_peft_state_dict(), adapter_name="b")
    try:
        tiny_pipe.set_adapters(["a", "b"], [0.7, 0.5])
        generator = torch.Generator().manual_seed(0)
        theirs = tiny_pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=generator,
                           output_type="latent").images
    finally:
        tiny_pipe.unload_lora_weights()
    assert (ours - theirs).abs().max() < 1e-5


def test_switch_activates_the_scheduled_lora_at_each_step(tiny_pipe, tiny_loras, monkeypatch):
    from studio.lora.inject import LoraLayer

    seen = []
    original = LoraLayer.forward

    def recording(self, x, *args, **kwargs):
        if self.name == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            seen.append(tuple(self.active_adapters()))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "forward", recording)
    entries = [LoraEntry(file=str(tiny_loras[n])) for n in ("alpha", "beta", "gamma")]
    result = compose(tiny_pipe, spec("switch", entries, steps=6, params={"switch_step": 2}))
    names = list(result.info["loras"])
    assert result.info["schedule"] == [names[0], names[0], names[1], names[1], names[2], names[2]]
    assert seen == [(n,) for n in result.info["schedule"]]


def test_composite_averages_per_lora_predictions(tiny_pipe, tiny_loras):
    from studio.engine import unet_pass
    from studio.lora.inject import only_adapters

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), weight=0.9), LoraEntry(file=str(tiny_loras["beta"]))]
    with prepared_session(tiny_pipe, spec("composite", entries)) as (session, composer):
        tiny_pipe.scheduler.set_timesteps(3)
        t = tiny_pipe.scheduler.timesteps[0]
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        fused = composer.predict(session, latents, 0, t)
        session.controller.adapter_batch_rows = {}  # the reference: one ordinary pass per LoRA
        uncond, cond = [], []
        for name in session.adapters:
            with only_adapters(tiny_pipe, [name]):
                conditioning = session.encode([PROMPT], [""], text_adapters=[name])
                out = unet_pass(tiny_pipe, torch.cat([latents, latents]), t, conditioning)
            uncond.append(out[:1])
            cond.append(out[1:])
        u, c = torch.stack(uncond).mean(0), torch.stack(cond).mean(0)
        assert torch.allclose(fused, u + 5.0 * (c - u), atol=1e-5)
        assert composer.passes(session) == 2.0
    sequential = compose(tiny_pipe, spec("composite", entries, params={"batched": False})).latents
    batched = compose(tiny_pipe, spec("composite", entries)).latents
    assert torch.allclose(sequential, batched, atol=1e-4)


def test_decor_identity_full_removal_and_word_tokens_only(tiny_pipe):
    from composers.decor import decor_bases, decor_transform, project_out, word_token_rows
    from studio.engine import encode

    rows = word_token_rows(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "striped cat")
    n_words = len(tiny_pipe.tokenizer("striped cat", add_special_tokens=False).input_ids)
    ids = tiny_pipe.tokenizer("striped cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        full = tiny_pipe.text_encoder(ids)[0][0]
    assert rows.shape[0] == n_words and torch.equal(rows, full[1:1 + n_words])  # no BOS / EOS / PAD rows
    (features, basis), = decor_bases(tiny_pipe, ["striped cat"])
    assert basis.shape[1] == n_words
    cond = encode(tiny_pipe, [PROMPT], [""], 64, 64)
    assert torch.equal(decor_transform(tiny_pipe, ["striped cat"], 0.0)(cond, True).embeds, cond.embeds)
    removed = decor_transform(tiny_pipe, ["striped cat"], 1.0)(cond, True).embeds
    assert torch.equal(removed[0], cond.embeds[0])  # the unconditional row is untouched
    assert (removed[1] @ basis).abs().max() < 1e-4
    half = project_out(cond.embeds[1], basis, 0.5)
    assert torch.allclose(half @ basis, 0.5 * (cond.embeds[1] @ basis), atol=1e-4)


def test_decor_runs_on_top_of_a_method_and_per_lora(tiny_pipe, tiny_loras):
    plain = compose(tiny_pipe, spec("merge")).latents
    decor = compose(tiny_pipe, spec("merge", decor=["red"], decor_strength=1.0)).latents
    assert not torch.allclose(plain, decor)
    entry = LoraEntry(file=str(tiny_loras["gamma"]), role="style", decor=["circle"])
    per_lora = compose(tiny_pipe, spec("regional", [entry])).latents
    without = compose(tiny_pipe, spec("regional", [LoraEntry(file=str(tiny_loras["gamma"]), role="style")])).latents
    assert not torch.allclose(per_lora, without)


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
    from composers.b4m import create_plp_adapter

    one, two, other = (create_plp_adapter(tiny_pipe.unet, 4, s) for s in (7, 7, 8))
    assert set(one) == set(two) and len(one) > 10
    for name in one:
        assert torch.equal(one[name].A, two[name].A) and torch.equal(one[name].C, two[name].C)
    square = next(n for n, f in one.items() if f.A.shape[0] * 2 == f.C.shape[1] * 2 and f.A.abs().sum() > 0)
    assert not torch.equal(one[square].A, other[square].A)


def test_b4m_assembly_reproduces_the_block_formula(tiny_pipe, tmp_path):
    from composers.b4m import assemble, create_plp_adapter, save_plp_adapter

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
    from composers.b4m import assemble, create_plp_adapter, save_plp_adapter

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
    from composers.b4m import assemble, create_plp_adapter, save_plp_adapter

    content = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 5), 1, "BD")
    style = _random_trained(create_plp_adapter(tiny_pipe.unet, 4, 5), 2, "BD")
    save_plp_adapter(tmp_path / "c.safetensors", content, "content", 5)
    save_plp_adapter(tmp_path / "s.safetensors", style, "style", 5)
    assemble(tmp_path / "c.safetensors", tmp_path / "s.safetensors", tmp_path / "made.safetensors")
    entries = [LoraEntry(file=str(tmp_path / "c.safetensors")), LoraEntry(file=str(tmp_path / "s.safetensors"), role="style")]
    ours = compose(tiny_pipe, spec("b4m", entries)).latents
    merged = compose(tiny_pipe, spec("merge", [LoraEntry(file=str(tmp_path / "made.safetensors"))])).latents
    assert (ours - merged).abs().max() < 1e-5


def test_b4m_break_trains_only_the_learnable_halves_and_restores_the_unet(tiny_pipe, tmp_path):
    from composers.b4m import PLPLinear, BreakConfig, break_train, create_plp_adapter, read_plp_adapter

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

    import composers.b4m as b4m
    from composers.b4m import BreakConfig, break_train
    from studio.lora import inspect_lora

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

    import composers.b4m as b4m
    from composers.b4m import BreakConfig, break_train
    from studio.lora import inspect_lora

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
    import random as _random

    from composers.b4m import _render_batch, _train_plp, create_plp_adapter
    from studio.toyworld.render import random_scene

    def batch_for_step(rng, step, n):  # every image main, or none
        return (*_render_batch([random_scene(rng) for _ in range(n)], rng), [main] * n)

    trained, _ = _train_plp(tiny_pipe, create_plp_adapter(tiny_pipe.unet, 2, 3), batch_for_step, 1e-3, 1e-3, 2, 2,
                            0, "split", False, main_half="D")
    B_moved = any(f.B.abs().sum() > 0 for f in trained.values())
    D_moved = any(f.D.abs().sum() > 0 for f in trained.values())
    assert (D_moved, B_moved) == ((True, False) if main else (False, True))


@pytest.mark.parametrize("role, aux, message", [
    ("style", ("cyanotype",), "a style adapter's auxiliary sets are plain contents"),
    ("content", ("teal",), "unknown auxiliary style 'teal'"),
])
def test_b4m_break_refuses_wrong_auxiliary_styles(tiny_pipe, tmp_path, role, aux, message):
    from composers.b4m import BreakConfig, break_train

    kind, subject = ("style", "sepia") if role == "style" else ("concept", "cross")
    cfg = BreakConfig(role, kind, subject, "ohwx", seed=3, rank=2, steps=1, batch_size=2, aux_styles=aux)
    with pytest.raises(ValueError, match=message):
        break_train(tiny_pipe, cfg, tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_b4m_break_refuses_an_unknown_subject_before_training(tiny_pipe, tmp_path):
    from composers.b4m import PLPLinear, BreakConfig, break_train

    cfg = BreakConfig("style", "style", "teal", "tl", seed=3, rank=2, steps=2, batch_size=2)
    with pytest.raises(ValueError, match="unknown texture or palette 'teal'"):
        break_train(tiny_pipe, cfg, tmp_path / "s.safetensors", progress=False)
    assert not (tmp_path / "s.safetensors").exists()
    assert not any(isinstance(m, PLPLinear) for m in tiny_pipe.unet.modules())


def test_b4m_break_on_a_folder_of_images_with_captions(tiny_pipe, tmp_path):
    import random as _random

    from composers.b4m import ImageFolder, break_train_folders, create_plp_adapter, read_plp_adapter
    from studio.errors import StudioError
    from studio.toyworld.render import random_scene, render

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


def _shapes_world_pair(pipe, tmp_path):
    from composers.b4m import BreakConfig, break_train

    content = break_train(pipe, BreakConfig("content", "concept", "cross", "ohwx", seed=3, rank=2, steps=1,
                                            batch_size=2, embedding=True), tmp_path / "c.safetensors", progress=False)
    style = break_train(pipe, BreakConfig("style", "style", "sepia", "sepx", seed=3, rank=2, steps=1, batch_size=2,
                                          embedding=True, trigger_after_noun=True), tmp_path / "s.safetensors",
                        progress=False)
    return content, style


def test_b4m_make_refuses_to_fine_tune_a_pair_on_another_base_model(tiny_pipe, sd15_pipe, tmp_path):
    from composers.b4m import PLPLinear, make

    content, style = _shapes_world_pair(tiny_pipe, tmp_path)
    with pytest.raises(LoraError, match=r"^c\.safetensors was made for shapes-world; this model is SD1\.x\.$"):
        make(sd15_pipe, content, style, tmp_path / "made.safetensors", finetune_steps=1)
    assert not (tmp_path / "made.safetensors").exists()
    assert not any(isinstance(m, PLPLinear) for m in sd15_pipe.unet.modules())


def test_b4m_make_fine_tunes_both_learnable_halves_of_the_assembly_and_keeps_the_frozen_ones(tiny_pipe, tmp_path):
    from composers.b4m import PLPLinear, assemble, make, read_plp_adapter
    from studio.lora import load_lora

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

    from composers.b4m import ImageFolder, break_train_folders, make
    from studio.toyworld.render import random_scene, render

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


def test_b4m_method_runs_a_made_adapter_as_it_is_and_refuses_it_beside_others(tiny_pipe, tmp_path):
    from composers.b4m import assemble, create_plp_adapter, save_plp_adapter

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
