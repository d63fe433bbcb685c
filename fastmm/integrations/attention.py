"""transformers' attention interface on fastmm's span and decode attention, conforming to transformers' sdpa.

transformers calls ``fn(module, query [B, Hq, Lq, d], key [B, Hkv, S, d], value, attention_mask, scaling=...,
dropout=..., **kwargs)`` and expects (output [B, Lq, Hq, d], attention weights or None). ``attention_forward``
gives what ``sdpa_attention_forward`` gives for every argument transformers passes:

- ``attention_mask``: a ``MaskLayout`` from fastmm's registered mask function (fastmm.integrations.masks), or
  any boolean / additive float tensor broadcastable to [B, 1, Lq, S] or [B, Hq, Lq, S], or None;
- None means what sdpa makes of it: causal when the module is causal (``is_causal`` kwarg, else
  ``module.is_causal``, default True) and Lq > 1, queries aligned to the first keys (SDPA's is_causal); else
  every query attends every key (vision towers, encoders, a single decoding query);
- ``dropout`` (training), ``softcap`` (Gemma 2), ``s_aux`` sinks (gpt-oss), ``sliding_window`` (already in
  transformers' masks; applied to a None mask), ``position_bias`` (additive, per head), ``output_attentions``
  (the weights are computed and returned, as eager attention returns them).

Dispatch: a full sequence (Lq = S) runs span_attention over the layout's key ranges, padding and mask; new tokens
against a cache run decode_attention when the layout is plain causal for them, or for a single query whatever the
mask; anything else runs span_attention over ranges of Lq queries into S keys. Per-head masks and biases run the
same kernels with heads folded into the batch. Only attention dropout and a value head size that differs from the
key's take a dense PyTorch path (fp32, O(Lq S) memory per head).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmm import ops
from fastmm.integrations.masks import MaskLayout, layout_from_tensor, mask_layout, plain_ranges
from fastmm.ops.attention import allowed_keys, attention_scores, attention_weights, dense_mask, floor_mask


def _none_mask_layout(module, batch, num_queries, num_keys, is_causal, sliding_window, device) -> MaskLayout:
    """What sdpa does without a mask: SDPA's is_causal (top-left aligned) for causal modules and Lq > 1, else
    every key. A sliding window keeps keys with query - key < window (both sides when not causal)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(is_causal) and num_queries > 1
    kv_start, kv_end = plain_ranges(batch, num_queries, num_keys, 0, causal, device)
    if sliding_window:
        position = torch.arange(num_queries, device=device, dtype=torch.int32)
        kv_start = torch.maximum(kv_start, (position - sliding_window + 1).clamp_min(0))
        if not causal:
            kv_end = torch.minimum(kv_end, (position + sliding_window).clamp_max(num_keys))
    return MaskLayout(kv_start, kv_end, suffix_causal=causal and num_queries == num_keys)


def _fold_into_mask(layout: MaskLayout, num_keys: int) -> torch.Tensor | None:
    """The layout as one [B, Lq, S] mask (bool, or float with -inf where not allowed) for decode_attention, which
    applies its own causal rule and a mask; None when nothing restricts the keys beyond that rule."""
    if layout.suffix_causal:
        allowed = None
    else:
        allowed = dense_mask(layout.kv_start, layout.kv_end, num_keys)[:, 0]
    if layout.key_keep is not None:
        keep = layout.key_keep[:, None, :]
        allowed = keep.expand(-1, layout.kv_start.shape[1], -1) if allowed is None else allowed & keep
    mask = layout.mask
    if mask is None or mask.dtype == torch.bool:
        return mask if allowed is None else (allowed if mask is None else allowed & mask)
    return mask if allowed is None else mask.masked_fill(~allowed, float("-inf"))


def _attend(query, key, value, layout: MaskLayout, scale, softcap, sinks) -> torch.Tensor:
    """[B, Hq, Lq, d] attention of the layout on fastmm's kernels (see the module docstring)."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    if num_queries < num_keys and (layout.suffix_causal or num_queries == 1):
        cache_len = torch.full((query.shape[0],), num_keys, dtype=torch.int32, device=query.device)
        mask = _fold_into_mask(layout, num_keys)
        return ops.decode_attention(query, key, value, cache_len, scale, mask=mask, softcap=softcap, sinks=sinks)
    return ops.span_attention(
        query, key, value, layout.kv_start, layout.kv_end, scale,
        key_keep=layout.key_keep, mask=layout.mask, softcap=softcap, sinks=sinks,
    )  # fmt: skip


def _per_head_mask(attention_mask, position_bias, batch, heads, num_queries, num_keys) -> torch.Tensor:
    """[B, Hq, Lq, S] of a mask and / or bias that differs per head: bool when only a bool mask, else float
    (where a bool mask masks, the bias becomes finfo.min, as sdpa's create_position_bias_mask makes it)."""
    shape = (batch, heads, num_queries, num_keys)
    if position_bias is None:
        return attention_mask.expand(shape)
    bias = position_bias.float().expand(shape)
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask.expand(shape), torch.finfo(torch.float32).min)
    return bias + attention_mask.float().expand(shape)


def _attend_per_head(query, key, value, mask, scale, softcap) -> torch.Tensor:
    """A per-head [B, Hq, Lq, S] mask: every query head becomes a batch row of its own (K and V copied per query
    head), so the same kernels run with a [B * Hq, Lq, S] mask."""
    B, Hq, Lq, d = query.shape
    S = key.shape[2]
    group = Hq // key.shape[1]
    q = query.reshape(B * Hq, 1, Lq, d)
    k = key.repeat_interleave(group, dim=1).reshape(B * Hq, 1, S, d)
    v = value.repeat_interleave(group, dim=1).reshape(B * Hq, 1, S, d)
    layout = layout_from_tensor(mask.reshape(B * Hq, 1, Lq, S), B * Hq, Lq, S)
    return _attend(q, k, v, layout, scale, softcap, None).reshape(B, Hq, Lq, d)


def _dense_attention(query, key, value, allowed, bias, scale, softcap, sinks, dropout, training):
    """Attention through PyTorch ops in fp32 (autograd records it) under a bool mask ``allowed`` and an additive
    float ``bias`` (None or broadcastable to [B, Hq, Lq, S]): attention dropout, and a value head size that differs
    from the key's. O(Lq S) memory per head."""
    num_keys = key.shape[2]
    scores = attention_scores(query, key, scale, softcap or 0.0)
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :num_keys]  # a row that attends nothing: zeros
    probs = nn.functional.dropout(probs, p=dropout, training=training)
    values = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    return (probs @ values).to(query.dtype)


def _layout_bias(layout: MaskLayout) -> torch.Tensor | None:
    """The layout's additive [B, 1, Lq, S] bias, if its mask is a float one."""
    mask = layout.mask
    return None if mask is None or mask.dtype == torch.bool else mask[:, None]


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | MaskLayout | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers AttentionInterface function with sdpa's semantics (see the module docstring).

    Args:
        module: the calling attention module (its ``is_causal`` decides a None mask, as for sdpa).
        query [B, Hq, Lq, d], key / value [B, Hkv, S, d]: Hq a multiple of Hkv.
        attention_mask: MaskLayout, bool or float tensor broadcastable to [B, 1 or Hq, Lq, S], or None.
        dropout: attention dropout probability, applied when the module is training.
        scaling: softmax scale, default d ** -0.5.
        is_causal, position_bias: as sdpa_attention_forward takes them.
        kwargs: ``softcap``, ``s_aux`` ([Hq] sink logits), ``sliding_window``, ``output_attentions``; the
            others transformers passes (position ids, cache details) do not change attention.

    Returns:
        ([B, Lq, Hq, d] in query's dtype, the [B, Hq, Lq, S] attention weights if output_attentions else None).
    """
    B, Hq, Lq, _ = query.shape
    S = key.shape[2]
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    output_attentions = bool(kwargs.get("output_attentions"))
    if dropout and not 0.0 <= dropout < 1.0:
        raise ValueError(f"attention_forward: dropout must be in [0, 1), got {dropout}")
    if key.shape[1] == 0 or Hq % key.shape[1]:
        raise ValueError(f"attention_forward: query heads ({Hq}) must be a multiple of key heads ({key.shape[1]})")

    if position_bias is not None and isinstance(attention_mask, MaskLayout):
        raise ValueError("attention_forward: position_bias needs a tensor mask or None, got a MaskLayout")
    per_head = position_bias is not None or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[1] > 1
    )
    if isinstance(attention_mask, MaskLayout):
        layout = attention_mask
    elif attention_mask is None and not per_head:
        layout = _none_mask_layout(module, B, Lq, S, is_causal, kwargs.get("sliding_window"), query.device)
    elif not per_head:
        layout = layout_from_tensor(attention_mask, B, Lq, S)
    else:
        if attention_mask is None:
            plain = _none_mask_layout(module, B, Lq, S, is_causal, kwargs.get("sliding_window"), query.device)
            attention_mask = dense_mask(plain.kv_start, plain.kv_end, S)
        layout = None

    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    dense = (dropout > 0.0 and module.training) or value.shape[-1] != query.shape[-1]
    if layout is None:
        mask = _per_head_mask(attention_mask, position_bias, B, Hq, Lq, S)
        if output_attentions or (sinks is not None and not dense):
            raise ValueError(
                "attention_forward: a per-head mask or position_bias together with "
                f"{'output_attentions' if output_attentions else 's_aux sinks'} is not supported"
            )
        if dense:
            bias = None if mask.dtype == torch.bool else floor_mask(mask)
            allowed = mask if bias is None else bias != float("-inf")
            out = _dense_attention(query, key, value, allowed, bias, scale, softcap, sinks, dropout, module.training)
        else:
            out = _attend_per_head(query, key, value, mask, scale, softcap)
        return out.transpose(1, 2).contiguous(), None

    if dense:
        allowed = allowed_keys(layout.kv_start, layout.kv_end, S, layout.key_keep, layout.mask)
        bias = _layout_bias(layout)
        out = _dense_attention(query, key, value, allowed, bias, scale, softcap, sinks, dropout, module.training)
    else:
        out = _attend(query, key, value, layout, scale, softcap, sinks)
    weights = None
    if output_attentions:
        weights = attention_weights(
            query, key, layout.kv_start, layout.kv_end, scale, layout.key_keep, layout.mask, softcap or 0.0, sinks
        )
    return out.transpose(1, 2).contiguous(), weights


def register_with_transformers(name: str = "fastmm") -> str:
    """Register attention_forward and fastmm's mask function (fastmm.integrations.masks.mask_layout) under
    ``name`` in transformers' AttentionInterface and AttentionMaskInterface; use it as
    ``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``. Returns name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_layout)
    return name
