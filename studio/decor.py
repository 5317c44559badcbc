"""DECOR (Jang et al. 2024, arXiv 2412.09169; docs/methods.md §5): remove the span of undesired words' text
embeddings from the conditional prompt embeddings, once per prompt, before denoising.

X̃ = Ũ Σ̃ Ṽᵀ (rows: the undesired words' token embeddings after the text encoder, no BOS/EOS/PAD),
X' = X − α · X Ṽ Ṽᵀ. SDXL projects each text encoder's block of the embedding separately; the pooled
embedding is left untouched. Usable on top of every method (spec `decor`) and per LoRA (entry `decor`).
"""
from __future__ import annotations

from typing import Callable

import torch

from studio.engine import Conditioning, is_sdxl


def word_token_rows(tokenizer, text_encoder, phrase: str, hidden_state_index: int | None = None) -> torch.Tensor:
    """The text encoder's output rows of the phrase's word tokens only (no start, end or padding)."""
    ids = tokenizer(phrase, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    n_words = len(tokenizer(phrase, add_special_tokens=False, truncation=True,
                            max_length=tokenizer.model_max_length - 2).input_ids)
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=hidden_state_index is not None)
    hidden = out.hidden_states[hidden_state_index] if hidden_state_index is not None else out[0]
    return hidden[0, 1:1 + n_words]


def undesired_basis(rows: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Ṽ: an orthonormal basis (d, r) of the row span of X̃."""
    _, singular, vh = torch.linalg.svd(rows.float(), full_matrices=False)
    keep = singular > rtol * singular.max()
    return vh[keep].T


def project_out(embeddings: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """X − α · X Ṽ Ṽᵀ."""
    basis = basis.to(embeddings.dtype).to(embeddings.device)
    return embeddings - strength * (embeddings @ basis) @ basis.T


def decor_bases(pipe, words: list[str]) -> list[tuple[slice, torch.Tensor]]:
    """(feature slice, basis) per text-encoder block of the UNet's conditioning."""
    if not is_sdxl(pipe):
        rows = torch.cat([word_token_rows(pipe.tokenizer, pipe.text_encoder, w) for w in words])
        return [(slice(None), undesired_basis(rows))]
    # SDXL conditions on the penultimate hidden states of both encoders, concatenated along features
    d1 = pipe.text_encoder.config.hidden_size
    rows1 = torch.cat([word_token_rows(pipe.tokenizer, pipe.text_encoder, w, -2) for w in words])
    rows2 = torch.cat([word_token_rows(pipe.tokenizer_2, pipe.text_encoder_2, w, -2) for w in words])
    return [(slice(0, d1), undesired_basis(rows1)), (slice(d1, None), undesired_basis(rows2))]


def decor_transform(pipe, words: list[str], strength: float) -> Callable[[Conditioning, bool], Conditioning]:
    """A transform of encoded conditioning that projects its conditional rows: the second half when it
    carries unconditional rows first ([uncond..., cond...]), else every row."""
    bases = decor_bases(pipe, words)

    def transform(cond: Conditioning, has_uncond: bool) -> Conditioning:
        embeds = cond.embeds.clone()
        conditional = slice(embeds.shape[0] // 2, None) if has_uncond else slice(None)
        for features, basis in bases:
            embeds[conditional, :, features] = project_out(embeds[conditional, :, features], basis, strength)
        return Conditioning(embeds, cond.added)

    return transform
