import pytest
import torch
from safetensors.torch import save_file

from studio.errors import LoraError
from studio.lora import inspect_lora, load_lora
from studio.lora.inject import attach_lora, attached_adapters, detach_lora, lora_layers
from tests.helpers import encode


def lora_with_words(tiny_pipe, path, words: dict, width=None):
    """A one-layer kohya LoRA (attn2.to_k of the tiny UNet) bundling `words` {word: vectors}."""
    width = width or tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1]
    layer = tiny_pipe.unet.get_submodule("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k")
    gen = torch.Generator().manual_seed(0)
    state = {"lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
             torch.randn(2, layer.in_features, generator=gen),
             "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
             torch.randn(layer.out_features, 2, generator=gen)}
    for word, vectors in words.items():
        state[f"bundle_emb.{word}.string_to_param.*"] = vectors if vectors.shape[-1] == width else \
            torch.randn(vectors.shape[0], width, generator=gen)
    save_file(state, str(path), metadata={"ss_base_model_version": "shapes_world_v1"})
    return path


def test_a_bundled_word_is_read_attached_with_its_lora_and_removed_with_it(tiny_pipe, tmp_path):
    vector = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    path = lora_with_words(tiny_pipe, tmp_path / "ringed.safetensors", {"rngd": vector})
    info = inspect_lora(path)
    assert info.embeddings == ["rngd"] and info.trigger_words[0] == "rngd" and "embeddings  rngd" in info.summary()
    weights = load_lora(path)
    assert torch.equal(weights.embeddings["rngd"]["text_encoder"], vector)
    vocabulary, before = len(tiny_pipe.tokenizer), encode(tiny_pipe)
    injected = attach_lora(tiny_pipe, weights, "ringed")
    try:
        assert injected == weights.parameter_count()
        assert tiny_pipe.tokenizer.tokenize("a red rngd star")[2] == "rngd"  # one token, not r + ng + d
        row = tiny_pipe.tokenizer.convert_tokens_to_ids("rngd")
        assert torch.equal(tiny_pipe.text_encoder.get_input_embeddings().weight[row], vector[0])
        assert not torch.allclose(encode(tiny_pipe), before)
    finally:
        detach_lora(tiny_pipe, "ringed")
    assert len(tiny_pipe.tokenizer) == vocabulary and torch.equal(encode(tiny_pipe), before)
    # the table and the config agree again (diffusers leaves vocab_size grown: a saved pipeline would not load)
    assert tiny_pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocabulary
    assert tiny_pipe.text_encoder.config.vocab_size == vocabulary


def test_words_of_two_loras_come_and_go_each_with_its_own(tiny_pipe, tmp_path):
    gen = torch.Generator().manual_seed(2)
    first = lora_with_words(tiny_pipe, tmp_path / "a.safetensors", {"rngd": torch.randn(1, 128, generator=gen)})
    second = lora_with_words(tiny_pipe, tmp_path / "b.safetensors", {"dtt": torch.randn(2, 128, generator=gen)})
    alone = {}
    for name, path in (("a", first), ("b", second)):
        attach_lora(tiny_pipe, path, name)
        alone[name] = encode(tiny_pipe, "a rngd and a dtt star")
        detach_lora(tiny_pipe, name)
    attach_lora(tiny_pipe, first, "a")
    attach_lora(tiny_pipe, second, "b")  # a word of two vectors: "dtt dtt_1"
    detach_lora(tiny_pipe, "a")  # removing the first word leaves the second one's vectors in place
    try:
        assert torch.equal(encode(tiny_pipe, "a rngd and a dtt star"), alone["b"])
    finally:
        detach_lora(tiny_pipe, "b")


@pytest.mark.parametrize("words, width, problem", [
    ({"a": torch.zeros(1, 128)}, None, "already a token of this model's tokenizer"),
    ({"rngd": torch.zeros(1, 64)}, 64, "width 64, but this model's text_encoder reads width 128"),
])
def test_a_word_the_pipeline_cannot_take_is_refused_before_anything_is_attached(tiny_pipe, tmp_path, words, width,
                                                                                 problem):
    path = lora_with_words(tiny_pipe, tmp_path / "bad.safetensors", words, width)
    vocabulary = len(tiny_pipe.tokenizer)
    with pytest.raises(LoraError, match=problem) as error:
        attach_lora(tiny_pipe, path, "bad")
    assert str(error.value).startswith("bad.safetensors brings the word")
    assert lora_layers(tiny_pipe) == {} and len(tiny_pipe.tokenizer) == vocabulary


def test_a_word_another_attached_lora_brings_is_refused_and_a_failed_word_rolls_the_layers_back(tiny_pipe, tmp_path,
                                                                                                  monkeypatch):
    first = lora_with_words(tiny_pipe, tmp_path / "a.safetensors", {"rngd": torch.zeros(1, 128)})
    second = lora_with_words(tiny_pipe, tmp_path / "b.safetensors", {"rngd": torch.ones(1, 128)})
    attach_lora(tiny_pipe, first, "a")
    try:
        with pytest.raises(LoraError, match="which the attached LoRA 'a' already brings"):
            attach_lora(tiny_pipe, second, "b")
        assert list(attached_adapters(tiny_pipe)) == ["a"]
    finally:
        detach_lora(tiny_pipe, "a")
    vocabulary = len(tiny_pipe.tokenizer)

    def fail(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(type(tiny_pipe), "load_textual_inversion", fail)
    with pytest.raises(LoraError, match="could not be attached .*disk gone.*left unchanged"):
        attach_lora(tiny_pipe, first, "a")
    assert lora_layers(tiny_pipe) == {} and len(tiny_pipe.tokenizer) == vocabulary


@pytest.mark.parametrize("keys, problem", [
    ({"bundle_emb.rngd.weird": torch.zeros(1, 4)}, "bundled embedding key of an unknown form"),
    ({"bundle_emb.rngd.string_to_param.*": torch.zeros(1, 4)}, "holds only textual-inversion embeddings (rngd)"),
])
def test_a_bad_bundled_embedding_gets_one_sentence(tmp_path, keys, problem):
    path = tmp_path / "thing.safetensors"
    save_file(keys, str(path))
    with pytest.raises(LoraError, match=problem.replace("(", r"\(").replace(")", r"\)")) as error:
        inspect_lora(path)
    assert str(error.value).startswith("thing.safetensors ") and "\n" not in str(error.value)


def test_sdxl_bundled_embeddings_name_each_text_encoder(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 640),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(640, 2),
               "bundle_emb.hero.clip_l": torch.zeros(2, 768), "bundle_emb.hero.clip_g": torch.zeros(2, 1280)},
              str(path))
    words = load_lora(path).embeddings
    assert {c: tuple(v.shape) for c, v in words["hero"].items()} == {"text_encoder": (2, 768),
                                                                      "text_encoder_2": (2, 1280)}


def test_token_positions_count_every_vector_of_a_learnt_word(tiny_pipe, tmp_path):
    from attention.tokens import content_token_indices, token_indices

    path = lora_with_words(tiny_pipe, tmp_path / "dots.safetensors", {"dtt": torch.zeros(3, 128)})
    prompt = "a dtt red star and a blue circle"
    plain = token_indices(tiny_pipe.tokenizer, prompt, ["star", "circle"])
    attach_lora(tiny_pipe, path, "dots")
    try:  # "a dtt dtt_1 dtt_2 red star ...": the start token, a, three vectors, red, then star
        assert token_indices(tiny_pipe.tokenizer, prompt, ["dtt"]) == [2, 3, 4]
        assert token_indices(tiny_pipe.tokenizer, prompt, ["star", "circle"]) == [6, 10]
        assert len(content_token_indices(tiny_pipe.tokenizer, prompt)) == 10
    finally:
        detach_lora(tiny_pipe, "dots")
    assert plain == [5, 9]  # without the word, "dtt" is the tokenizer's own two pieces, d + tt

