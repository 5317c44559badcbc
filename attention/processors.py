"""Attention processors: small callables that read the controller; registered by layer name."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.controller import CompositionController


def attend(query, key, value, mask: torch.Tensor | None = None, want_probs: bool = False):
    """Multi-head attention over (batch, heads, tokens, dim) tensors. SDPA unless the probabilities are
    wanted; `mask` is boolean (True = attend), broadcast over batch and heads."""
    if not want_probs:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask), None
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return probs @ value, probs


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class StudioAttnProcessor:
    """One attention layer (attn1 or attn2) under the studio's controller.

    attn1: concept isolation (boolean SDPA mask), self-attention maps recorded where asked.
    attn2: one key/value per cross-attention context (global prompt, each region's prompt with its
    LoRA), outputs blended by the contexts' region weights; maps recorded where asked.
    """

    def __init__(self, name: str, controller: CompositionController):
        self.name = name
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        ctrl = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attention_mask is not None:
            raise NotImplementedError("StudioAttnProcessor does not take an attention_mask from the pipeline")

        n_queries = hidden_states.shape[1]
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        store = ctrl.store if ctrl.store is not None and ctrl.store.wants(self.name) else None
        if encoder_hidden_states is None:
            out = self._self_attention(attn, hidden_states, query, n_queries, store)
        else:
            out = self._cross_attention(attn, encoder_hidden_states, query, n_queries, store)

        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _self_attention(self, attn, hidden_states, query, n_queries, store):
        key = _split_heads(attn.to_k(hidden_states), attn.heads)
        value = _split_heads(attn.to_v(hidden_states), attn.heads)
        mask = self.controller.isolation_at(*self.controller.grid(n_queries)) if self.controller.contexts else None
        if mask is not None:
            mask = mask.to(query.device)
        out, probs = attend(query, key, value, mask, want_probs=store is not None)
        if store is not None:
            store.record(self.name, "self", probs)
        return _merge_heads(out)

    def _cross_attention(self, attn, encoder_hidden_states, query, n_queries, store):
        ctrl = self.controller
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if not ctrl.contexts:
            key = _split_heads(attn.to_k(encoder_hidden_states), attn.heads)
            value = _split_heads(attn.to_v(encoder_hidden_states), attn.heads)
            out, probs = attend(query, key, value, want_probs=store is not None)
            if store is not None:
                store.record(self.name, "global", probs)
            return _merge_heads(out)

        grid = ctrl.grid(n_queries)
        weights, supports = ctrl.context_weights(*grid), ctrl.context_support(*grid)
        blended = None
        for context, weight, support in zip(ctrl.contexts, weights, supports):
            if store is None and not bool(weight.any()):
                continue
            key, value = self._context_keys_values(attn, context, query.dtype)
            weight = weight.to(query.dtype).to(query.device)
            if store is None and support is not None:
                # only the queries this context is blended into (its region): the others' outputs would be × 0
                support = support.to(query.device)
                out, _ = attend(query[:, :, support], key, value)
                contribution = _merge_heads(out) * weight[support][None, :, None]
                if blended is None:
                    blended = query.new_zeros(query.shape[0], n_queries, contribution.shape[-1])
                blended = blended.index_add(1, support, contribution)
                continue
            out, probs = attend(query, key, value, want_probs=store is not None)
            if store is not None:
                store.record(self.name, context.name, probs)
            contribution = _merge_heads(out) * weight[None, :, None]
            blended = contribution if blended is None else blended + contribution
        return blended

    def _context_keys_values(self, attn, context, dtype):
        """A context's keys and values at this layer (its own adapters active in to_k / to_v), computed once per
        generation when its embeddings carry no gradient."""
        from studio.lora.inject import only_adapters

        cache_key = self.controller.cross_kv_key(self.name, context)
        if cache_key is not None and cache_key in self.controller.cross_kv:
            return self.controller.cross_kv[cache_key]
        embeddings = context.embeddings.to(dtype)
        if attn.norm_cross:
            embeddings = attn.norm_encoder_hidden_states(embeddings)
        with only_adapters([attn.to_k, attn.to_v], context.adapters):
            key = _split_heads(attn.to_k(embeddings), attn.heads)
            value = _split_heads(attn.to_v(embeddings), attn.heads)
        if cache_key is not None:
            if torch.is_grad_enabled():
                key, value = key.detach(), value.detach()
            self.controller.cross_kv[cache_key] = (key, value)
        return key, value


def install_processors(unet, controller: CompositionController) -> dict:
    """Give every attention layer a StudioAttnProcessor; returns the previous processors (to restore)."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: StudioAttnProcessor(name.removesuffix(".processor"), controller)
                             for name in previous})
    return previous


def composer_layers(unet) -> list[str]:
    """The attention layers the composers read: those at the coarsest spatial resolution below the mid
    block (SD1.5: down_blocks.2 and up_blocks.1, the "H/32" layers; SDXL: down_blocks.2 and up_blocks.0)."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors if not n.startswith("mid_block")]
    depth = {}
    for name in names:
        block, index = name.split(".")[:2]
        level = int(index) if block == "down_blocks" else len(unet.config.block_out_channels) - 1 - int(index)
        depth[name] = level
    deepest = max(depth.values())
    return [n for n in names if depth[n] == deepest]
