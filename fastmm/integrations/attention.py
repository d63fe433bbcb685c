"""transformers' attention interface on fastmm's span / decode attention.

transformers calls ``fn(module, query [B, Hq, L, d], key [B, Hkv, S, d], value, attention_mask, scaling=...,
dropout=..., **kwargs)`` and expects (output [B, L, Hq, d], attention weights or None). Its mask (None for
plain causal, else [B, 1, L, S] bool or additive float) is turned into one key range per query; a mask that
is not a contiguous range per query (no mask of a transformers decoder is) raises ValueError. Callers that
already hold key ranges pass them as ``kv_start`` / ``kv_end`` keyword arguments and skip the mask.

transformers builds no mask at all for an attention name it has no mask function for (it assumes the
backend needs none), which would silently drop padding: ``register_with_transformers`` registers the
function together with transformers' boolean (sdpa) mask under one name.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmm import backend, ops
from fastmm.reference import attention as reference


def ranges_from_mask(
    attention_mask: torch.Tensor | None, batch: int, num_queries: int, num_keys: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end) int32 [B, L] equivalent to a transformers attention mask. None means causal with
    the L queries being the last L of the S keys."""
    if attention_mask is None:
        return reference.causal_ranges(batch, num_queries, num_keys, device)
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (num_queries, num_keys):
        raise ValueError(
            f"attention_forward: attention_mask must be [B, 1, L, S] = [{batch}, 1, {num_queries}, {num_keys}], "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, 0].expand(batch, num_queries, num_keys)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    counts = allowed.sum(dim=-1)
    first = allowed.int().argmax(dim=-1)
    kv_start = torch.where(counts > 0, first, torch.zeros_like(first))
    kv_end = kv_start + counts
    inside = reference.dense_mask(kv_start, kv_end, num_keys)[:, 0]
    if not torch.equal(inside, allowed):
        raise ValueError("attention_forward: attention_mask does not give each query one contiguous key range")
    return kv_start.int(), kv_end.int()


def _is_suffix_causal(kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int) -> bool:
    """Whether the ranges are what decode_attention computes: start 0, end S - L + i + 1."""
    start, end = reference.causal_ranges(*kv_start.shape, num_keys, kv_start.device)
    return torch.equal(kv_start.int(), start) and torch.equal(kv_end.int(), end)


def _attend(query, key, value, kv_start, kv_end, scaling):
    """span_attention for a full sequence (L == S); decode_attention for the last L of S keys when the ranges
    are causal (None: plain causal, nothing to inspect on the host); else the dense reference."""
    B, _, L, _ = query.shape
    S = key.shape[2]
    if L == S:
        return ops.span_attention(query, key, value, kv_start, kv_end, scaling)
    if kv_start is None or _is_suffix_causal(kv_start, kv_end, S):
        cache_len = torch.full((B,), S, dtype=torch.int32, device=query.device)
        return ops.decode_attention(query, key, value, cache_len, scaling)
    # e.g. left padding while decoding: a range that does not start at 0
    backend.warn_fallback("attention_forward", "decode_attention", "reference", "a padded mask while decoding")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = reference.dense_mask(kv_start, kv_end, S)
    return reference.masked_attention(query, key, value, mask, scale)[0].to(query.dtype)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface function: span_attention for a full sequence (L == S),
    decode_attention for new tokens against a cache (L < S, causal); returns ([B, L, Hq, d], None)."""
    if dropout:
        raise ValueError(f"attention_forward: attention dropout is not supported, got dropout={dropout}")
    kv_start, kv_end = kwargs.get("kv_start"), kwargs.get("kv_end")
    if kv_start is None and attention_mask is not None:
        B, _, L, _ = query.shape
        kv_start, kv_end = ranges_from_mask(attention_mask, B, L, key.shape[2], query.device)
    out = _attend(query, key, value, kv_start, kv_end, scaling)
    return out.transpose(1, 2).contiguous(), None

def register_with_transformers(name: str = "fastmm") -> str:
    """Register attention_forward and transformers' boolean mask builder under ``name`` (use it as
    ``model.set_attn_implementation(name)``). Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
