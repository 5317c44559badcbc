"""Token grounding while training the bundled model: TokenCompose's token loss L_token (Wang et al., CVPR 2024),
with the renderer's ground-truth boxes in place of segmentation masks.

Why: the UNet has no positional encoding, and by 8,000 steps of the plain recipe the model placed objects where
the initial noise put them, not where the prompt said (of 96 named objects, 68 drawn in their slot and 47 drawn in
slots the prompt left empty: the `objects` counts of `studio toyworld evaluate`). Pulling each object's words'
cross-attention into its box teaches the queries where they are and the words where they belong; these maps are
also what the composers read.
"""
from __future__ import annotations

import torch

from attention.masks import box_mask, token_grid
from studio.toyworld.render import Scene

# Words of an object's phrase whose causal embedding says nothing about the object ("a" precedes it).
UNGROUNDED_WORDS = frozenset({"a", "on", "in", "the"})


def object_token_positions(tokenizer, scene: Scene) -> list[tuple[tuple[float, float, float, float], list[int]]]:
    """For each object: its box and the positions (start token = 0) of its phrase's words in the caption, without
    the words of UNGROUNDED_WORDS. CLIP's BPE splits at spaces, so a phrase's tokens are its words' tokens."""
    caption = scene.caption()
    targets, cursor = [], 0
    for obj, phrase in scene.phrases():
        start = caption.index(phrase, cursor)
        cursor = start + len(phrase)
        position = 1 + len(tokenizer(caption[:start], add_special_tokens=False).input_ids)
        positions = []
        for word in phrase.split(" "):
            n_tokens = len(tokenizer(word, add_special_tokens=False).input_ids)
            if word not in UNGROUNDED_WORDS:
                positions.extend(range(position, position + n_tokens))
            position += n_tokens
        targets.append((obj.box, positions))
    return targets


def token_grounding_loss(maps: dict[str, torch.Tensor], targets: list[list[tuple[tuple, list[int]]]],
                         latent_size: tuple[int, int]) -> torch.Tensor:
    """Mean over layers, objects and their tokens of (1 - share of the token's attention inside the box)².

    `maps`: layer -> cross-attention probabilities (batch, heads, queries, tokens); `targets[i]`: the boxes and
    token positions of sample i's objects (empty for a dropped caption)."""
    losses = []
    for probs in maps.values():
        rows, cols = token_grid(probs.shape[2], *latent_size)
        per_query = probs.mean(1)  # (batch, queries, tokens)
        for i, objects in enumerate(targets):
            for box, positions in objects:
                inside = box_mask(box, rows, cols).flatten().to(per_query)
                token_maps = per_query[i][:, positions]  # (queries, k)
                share = (token_maps * inside[:, None]).sum(0) / token_maps.sum(0).clamp_min(1e-8)
                losses.append((1 - share) ** 2)
    if not losses:
        return torch.zeros(())
    return torch.cat(losses).mean()


def grounded_layers(unet) -> set[str]:
    """The cross-attention layers the loss reads: every attn2 outside the mid block (whose 4×4 map is too coarse
    for a box)."""
    return {name.removesuffix(".processor") for name in unet.attn_processors
            if ".attn2." in name and not name.startswith("mid_block")}
