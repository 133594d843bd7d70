"""Decode-step attention without copying the KV cache per query head (grouped-query attention), for fastdecode.

transformers 4.43's Llama sdpa attention expands K and V from 8 to 32 heads (`repeat_kv`) at every step: with a
static cache that is a copy of the whole cache, 4x over, per layer and per token, and it was most of the decode
step on the 8B shape (ISSUES_LOG B30). Here, for a one-token step into a StaticCache only, the query heads that
share a KV head are laid out as that head's query rows, so the same sdpa call reads each cached K/V once.
Every other call (prefill, training, transformers' own generate with its dynamic cache) runs the original code.
"""

from __future__ import annotations

import types

import torch


def install(model) -> int:
    """Give every Llama sdpa attention layer of `model` the grouped decode step; returns how many got it."""
    from transformers.models.llama.modeling_llama import LlamaSdpaAttention

    count = 0
    for module in model.modules():
        if type(module) is LlamaSdpaAttention and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def _forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
             output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    bsz, q_len, _ = hidden_states.shape
    if q_len != 1 or output_attentions or not isinstance(past_key_value, StaticCache):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_value=past_key_value, output_attentions=output_attentions,
                                  use_cache=use_cache, cache_position=cache_position,
                                  position_embeddings=position_embeddings, **kwargs)
    query = self.q_proj(hidden_states).view(bsz, 1, self.num_heads, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(bsz, 1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(bsz, 1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    cos, sin = self.rotary_emb(value, position_ids) if position_embeddings is None else position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key, value = past_key_value.update(key, value, self.layer_idx,
                                       {"sin": sin, "cos": cos, "cache_position": cache_position})
    # head h uses KV head h // groups (repeat_kv's order): [B, heads, 1, d] -> [B, kv_heads, groups, d]
    query = query.reshape(bsz, self.num_key_value_heads, self.num_key_value_groups, self.head_dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
    out = out.reshape(bsz, 1, self.num_heads * self.head_dim)
    return self.o_proj(out), None, past_key_value
