import json

import pytest
import torch

from studio.errors import StudioError
from studio.lora import load_lora
from tests.helpers import encode


def test_the_lora_trainer_learns_its_trigger_as_a_word_and_the_file_brings_it_back(tiny_pipe, tmp_path):
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    vocabulary, before = len(tiny_pipe.tokenizer), encode(tiny_pipe)
    pieces = tiny_pipe.tokenizer("rngd", add_special_tokens=False).input_ids
    start = tiny_pipe.text_encoder.get_input_embeddings().weight.detach()[pieces].mean(0)
    table = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=3, batch_size=2, rank=2, lr=1e-2,
                          embedding=True)
    path = train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False)
    # the pipeline is as it was: no new token, the table untouched, the same encodings
    assert len(tiny_pipe.tokenizer) == vocabulary and torch.equal(encode(tiny_pipe), before)
    assert tiny_pipe.text_encoder.config.vocab_size == vocabulary
    assert torch.equal(tiny_pipe.text_encoder.get_input_embeddings().weight, table)
    assert not tiny_pipe.text_encoder.get_input_embeddings().weight.requires_grad
    weights = load_lora(path)
    learnt = weights.embeddings["rngd"]["text_encoder"]
    assert learnt.shape == (1, 128) and (learnt[0] - start).abs().max() > 1e-3  # it trained
    assert json.loads(weights.info.metadata["studio_train_config"])["embedding"] is True


def test_the_lora_trainer_refuses_a_known_word_as_a_learnt_trigger_before_touching_the_pipeline(tiny_pipe, tmp_path):
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="a", steps=1, batch_size=2, rank=2, embedding=True)
    with pytest.raises(StudioError, match="A learnt embedding needs a made-up word"):
        train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False)
    assert not any("lora" in n.lower() for n, _ in tiny_pipe.unet.named_parameters())


def test_b4m_adapters_with_learnt_words_assemble_into_one_that_brings_both(tiny_pipe, tmp_path):
    from studio.errors import LoraError as Refused
    from studio.training.b4m import BreakConfig, break_train
    from studio.training.plp import assemble

    vocabulary = len(tiny_pipe.tokenizer)
    paths = {}
    for role, kind, subject, trigger in (("content", "concept", "cross", "ohwx"), ("style", "style", "ringed", "rngd")):
        cfg = BreakConfig(role, kind, subject, trigger, seed=3, rank=2, steps=2, batch_size=2, embedding=True)
        paths[role] = break_train(tiny_pipe, cfg, tmp_path / f"{role}.safetensors", progress=False)
        assert load_lora(paths[role]).embeddings[trigger]["text_encoder"].shape == (1, 128)
        assert len(tiny_pipe.tokenizer) == vocabulary
    assemble(paths["content"], paths["style"], tmp_path / "made.safetensors")
    made = load_lora(tmp_path / "made.safetensors")
    assert set(made.embeddings) == {"ohwx", "rngd"}
    assert torch.equal(made.embeddings["rngd"]["text_encoder"], load_lora(paths["style"]).embeddings["rngd"]["text_encoder"])
    same_word = BreakConfig("style", "style", "ringed", "ohwx", seed=3, rank=2, steps=1, batch_size=2, embedding=True)
    break_train(tiny_pipe, same_word, tmp_path / "clash.safetensors", progress=False)
    with pytest.raises(Refused, match="both bring the word 'ohwx'"):
        assemble(paths["content"], tmp_path / "clash.safetensors", tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_a_learnt_style_word_stands_where_texture_words_stand_and_an_unlearnt_one_after_the_colour():
    import random

    from studio.toyworld.lora_train import LoraTrainConfig, lora_scene

    for embedding, order in ((True, "{trigger} {colour}"), (False, "{colour} {trigger}")):
        cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", embedding=embedding)
        scene = lora_scene(random.Random(0), cfg)
        obj = scene.objects[0]
        assert f"a {obj.size} {order.format(trigger='rngd', colour=obj.colour)} {obj.shape}" in scene.caption()


def test_the_embedding_rate_must_be_above_zero(tiny_pipe, tmp_path):
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(kind="style", subject="ringed", trigger="rngd", steps=1, batch_size=2, rank=2,
                          embedding=True, embedding_lr=0.0)
    with pytest.raises(StudioError, match="The embedding's learning rate must be above 0, not 0"):
        train_lora(tiny_pipe, cfg, tmp_path / "ringed.safetensors", progress=False)
    assert not (tmp_path / "ringed.safetensors").exists()

