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
    return sorted({position for word in words for occurrence in word_occurrences(tokenizer, prompt, word)
                   for position in occurrence})


def content_token_indices(tokenizer, prompt: str) -> list[int]:
    """Positions of every word token of the prompt (no start, end or padding tokens)."""
    ids = tokenizer(spelt_out(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(range(1, len(ids) - 1))


def word_occurrences(tokenizer, prompt: str, word: str) -> list[tuple[int, ...]]:
    """Each occurrence of `word` in the encoded prompt, as the tuple of its token positions."""
    ids = tokenizer(spelt_out(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length).input_ids
    pattern = word_token_ids(tokenizer, word)
    return [tuple(range(i, i + len(pattern))) for i in range(1, len(ids) - len(pattern) + 1)
            if pattern and ids[i:i + len(pattern)] == pattern]


def deal_tokens(claims: list[list[tuple[int, ...]]]) -> dict[int, list[int]]:
    """Give every word occurrence of one prompt to one concept only. `claims[k]`: the occurrences concept k's words
    have in the prompt. An occurrence only one concept claims is that concept's; an occurrence several claim (two
    LoRAs bound to one word, as the official samples' "a <cat1> cat and a <dog2> dog" share nothing but two
    character LoRAs both bound to "woman" do) goes, in prompt order, to the first claimant that has no occurrence
    yet, so "a woman ... and a woman ..." gives the first woman to the first concept and the second to the second.
    Returns concept -> sorted positions."""
    owners: dict[tuple[int, ...], int] = {}
    claimants: dict[tuple[int, ...], list[int]] = {}
    for k, occurrences in enumerate(claims):
        for occurrence in occurrences:
            claimants.setdefault(occurrence, [])
            if k not in claimants[occurrence]:
                claimants[occurrence].append(k)
    for occurrence, ks in claimants.items():
        if len(ks) == 1:
            owners[occurrence] = ks[0]
    for occurrence in sorted(o for o, ks in claimants.items() if len(ks) > 1):
        has = set(owners.values())
        free = [k for k in claimants[occurrence] if k not in has]
        if free:
            owners[occurrence] = free[0]
    dealt: dict[int, list[int]] = {}
    for occurrence, k in owners.items():
        dealt.setdefault(k, []).extend(occurrence)
    return {k: sorted(set(v)) for k, v in sorted(dealt.items())}
