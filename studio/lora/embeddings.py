"""Textual-inversion words that come inside a LoRA file (kohya's `bundle_emb.*` from pivotal tuning,
cloneofsimo's `<s1>`): while the LoRA is attached, each word is a token of the pipeline's tokenizer(s)
whose input embedding is the file's vector(s); detaching removes them. diffusers' textual-inversion loader
does the adding and removing, so a word of n vectors is spelt "word word_1 … word_{n-1}" to the text encoder,
as diffusers' own prompt conversion does."""
from __future__ import annotations

from torch import Tensor

from studio.errors import LoraError

TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_OWNERS = "_studio_embedding_words"  # pipeline attribute: adapter name -> {component: [tokens]}


def embedding_tokens(word: str, vectors: Tensor) -> list[str]:
    """The tokens diffusers adds for a word of len(vectors) vectors."""
    return [word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])]


def attached_embeddings(pipe) -> dict[str, dict[str, list[str]]]:
    """Adapter name -> {text encoder component: the tokens it added}."""
    return getattr(pipe, _OWNERS, {})


def check_embeddings(pipe, embeddings: dict[str, dict[str, Tensor]], file: str) -> None:
    """Refuse (one sentence, nothing changed) a word this pipeline cannot take: no such text encoder, another
    width, or a token its tokenizer already has (a word of the vocabulary, or another attached LoRA's)."""
    owners = {token: adapter for adapter, per_component in attached_embeddings(pipe).items()
              for tokens in per_component.values() for token in tokens}
    for word, per_component in embeddings.items():
        for component, vectors in per_component.items():
            encoder, tokenizer = getattr(pipe, component, None), getattr(pipe, TOKENIZER_OF[component], None)
            if encoder is None or tokenizer is None:
                raise LoraError(f"{file} brings the word {word!r} for {component}, which this pipeline does not have.")
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise LoraError(f"{file} brings the word {word!r} as vectors of width {vectors.shape[1]}, but this "
                                f"model's {component} reads width {width}.")
            vocabulary = tokenizer.get_vocab()
            for token in embedding_tokens(word, vectors):
                if token in owners:
                    raise LoraError(f"{file} brings the word {word!r}, which the attached LoRA {owners[token]!r} "
                                    "already brings; detach it first.")
                if token in vocabulary:
                    raise LoraError(f"{file} brings the word {word!r}, which is already a token of this model's "
                                    f"{TOKENIZER_OF[component]}, so it cannot be given a new meaning.")


def add_embeddings(pipe, adapter: str, embeddings: dict[str, dict[str, Tensor]]) -> None:
    """Add the (checked) words under `adapter`; on any failure, the words added so far are removed again."""
    added: dict[str, list[str]] = {}
    try:
        for word, per_component in embeddings.items():
            for component, vectors in per_component.items():
                encoder = getattr(pipe, component)
                weight = encoder.get_input_embeddings().weight
                pipe.load_textual_inversion(vectors.to(weight.dtype), token=word, text_encoder=encoder,
                                            tokenizer=getattr(pipe, TOKENIZER_OF[component]))
                added.setdefault(component, []).extend(embedding_tokens(word, vectors))
    except BaseException:
        _remove(pipe, added)
        raise
    if added:
        setattr(pipe, _OWNERS, {**attached_embeddings(pipe), adapter: added})


def remove_embeddings(pipe, adapter: str) -> None:
    """Remove the words an adapter added (nothing when it added none)."""
    owners = dict(attached_embeddings(pipe))
    added = owners.pop(adapter, None)
    if added:
        _remove(pipe, added)
        setattr(pipe, _OWNERS, owners)


def _remove(pipe, added: dict[str, list[str]]) -> None:
    for component, tokens in added.items():
        unload_words(pipe, component, tokens)


def unload_words(pipe, component: str, tokens: list[str]) -> None:
    """Remove tokens from a tokenizer and its text encoder. diffusers' unloading shrinks the embedding table
    but leaves the text encoder's `config.vocab_size` at the grown size, so a pipeline saved afterwards could
    not be loaded again: the config is set back to the table's size."""
    encoder = getattr(pipe, component)
    pipe.unload_textual_inversion(tokens, tokenizer=getattr(pipe, TOKENIZER_OF[component]), text_encoder=encoder)
    encoder.config.vocab_size = encoder.get_input_embeddings().weight.shape[0]
