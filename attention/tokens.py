"""Token positions of words in a prompt, as the text encoder sees them (position 0 is the start token)."""
from __future__ import annotations


def spelt_out(tokenizer, text: str) -> str:
    """The text as the pipeline encodes it: a learnt word of n vectors (a LoRA's bundled embedding) spelt
    "word word_1 … word_{n-1}" by diffusers' own prompt conversion."""
    from diffusers.loaders import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin().maybe_convert_prompt(text, tokenizer)


def word_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without the start / end tokens."""
    return tokenizer(spelt_out(tokenizer, text), add_special_tokens=False).input_ids


def token_indices(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Positions in the encoded prompt (start token = 0) of every occurrence of each word; a word the BPE
    splits into several tokens yields all of them. Words not in the prompt yield nothing."""
    ids = tokenizer(spelt_out(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length).input_ids
    positions: list[int] = []
    for word in words:
        pattern = word_token_ids(tokenizer, word)
        if not pattern:
            continue
        for start in range(1, len(ids) - len(pattern) + 1):
            if ids[start:start + len(pattern)] == pattern:
                positions.extend(range(start, start + len(pattern)))
    return sorted(set(positions))


def content_token_indices(tokenizer, prompt: str) -> list[int]:
    """Positions of every word token of the prompt (no start, end or padding tokens)."""
    ids = tokenizer(spelt_out(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(range(1, len(ids) - 1))
