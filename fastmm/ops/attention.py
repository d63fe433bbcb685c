"""Op family `attention`: one key range per query for every mask a unified model needs, span attention over
those ranges (flash-style, tiles outside every range skipped), and decode attention over a static KV cache.

    query i may attend key j  <=>  kv_start[i] <= j < kv_end[i]

Causal text, bidirectional image spans, packed documents and sliding windows are all such ranges: O(L)
metadata instead of an L x L mask (see fastmm.reference.attention for a picture).

Forward runs on the chosen backend. Backward runs the backend's ``span_attention_bwd`` where it has one
(triton) and otherwise the reference's dense recompute (O(L^2) memory per head): training through
span_attention works everywhere, fast only where a backward kernel exists.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastmm import _validate as val
from fastmm.ops._spec import kernel_op
from fastmm.reference import attention as reference

Tensor = torch.Tensor

# The mask vocabulary and the dense attention weights, for layers above ops (the transformers integration builds
# masks and output_attentions with them). The reference's definitions are the spec; they are re-exported here so
# that nothing above ops imports a backend.
MASK_FLOOR = reference.MASK_FLOOR  # float masks are clamped at it; -inf stays -inf
floor_mask = reference.floor_mask
dense_mask = reference.dense_mask  # [B, 1, Lq, S] bool from key ranges
allowed_keys = reference.allowed_keys  # [B, 1, Lq, S] bool from ranges, key padding and a mask
attention_scores = reference.attention_scores  # fp32 q k^T * scale (softcapped), autograd recorded
attention_weights = reference.attention_weights  # softmax probabilities [B, Hq, Lq, S] (output_attentions)


# ------------------------------------------------------------------------------------------ key_ranges


def _check_spans(op: str, spans: Sequence[Sequence[tuple[int, int]]], batch: int | None, length: int) -> None:
    if batch is not None and len(spans) != batch:
        raise ValueError(f"{op}: spans must hold one list of (start, end) per batch row ({batch}), got {len(spans)}")
    for b, row in enumerate(spans):
        previous_end = 0
        for start, end in sorted(row):
            if not 0 <= start <= end <= length:
                raise ValueError(f"{op}: spans[{b}] has ({start}, {end}); expected 0 <= start <= end <= L = {length}")
            if start < previous_end:
                raise ValueError(f"{op}: spans[{b}] overlap at ({start}, {end}); expected disjoint spans")
            previous_end = end


def key_ranges(
    modality: torch.Tensor | None = None,
    spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    doc_ids: torch.Tensor | None = None,
    causal: bool = True,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ranges (kv_start, kv_end), int32 [B, L], for span_attention.

    Args:
        modality: [B, L] integer ids; every maximal run of nonzero ids (image tokens) is one image span.
        spans: instead of modality, explicit image spans: per batch row a list of (start, end), end exclusive.
        doc_ids: [B, L] integer document ids for packing; a run of one id is one document, and no query
            attends outside its document (a span is cut at a document boundary).
        causal: True: text causal, image tokens see their whole span and the past of their document.
            False: every token sees its whole document.
        length: L, needed only when spans alone give the layout.

    Returns:
        (kv_start, kv_end): query i of row b attends keys kv_start[b, i] <= j < kv_end[b, i].
    """
    op = "key_ranges"
    if modality is not None and spans is not None:
        raise ValueError(f"{op}: give image spans as modality or as spans, not both")
    tensors = {"modality": modality, "doc_ids": doc_ids}
    for name, t in tensors.items():
        if t is not None:
            val.check_tensor(op, name, t)
            val.check_ids(op, name, t)
            val.check_dim(op, name, t, 2, "[B, L]")
    shape_source = modality if modality is not None else doc_ids
    if shape_source is None:
        if spans is None or length is None:
            raise ValueError(f"{op}: expected modality or doc_ids [B, L], or spans with length; got neither")
        _check_spans(op, spans, None, length)
        return reference.key_ranges(spans=spans, length=length)
    if modality is not None and doc_ids is not None:
        val.check_shape(op, "doc_ids", doc_ids, modality.shape, "modality's shape")
        val.check_same_device(op, "modality", modality, doc_ids=doc_ids)
    B, L = shape_source.shape
    if length is not None and length != L:
        raise ValueError(f"{op}: length must match the layout tensors' L = {L}, got {length}")
    if spans is not None:
        _check_spans(op, spans, B, L)
    return reference.key_ranges(modality=modality, spans=spans, doc_ids=doc_ids, causal=causal)


# ------------------------------------------------------------------------------------- span_attention


@kernel_op("attention", "span_attention")
def span_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_start: Tensor,
    kv_end: Tensor,
    scale: float,
    key_keep: Optional[Tensor],
    mask: Optional[Tensor],
    softcap: float,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# Optional: the native backend trains through the reference's dense recompute.
@kernel_op("attention", "span_attention", name="span_attention_backward", optional=True)
def span_attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    kv_start: Tensor,
    kv_end: Tensor,
    scale: float,
    key_keep: Optional[Tensor],
    mask: Optional[Tensor],
    softcap: float,
    dlse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _span_attention_setup(ctx, inputs, output):
    q, k, v, kv_start, kv_end, scale, key_keep, mask, softcap = inputs
    o, lse = output
    ctx.scale, ctx.softcap = scale, softcap
    ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, key_keep, mask)


def _span_attention_backward(ctx, do, dlse):
    q, k, v, o, lse, kv_start, kv_end, key_keep, mask = ctx.saved_tensors
    if dlse is None:  # lse unused downstream
        dlse = torch.zeros_like(lse)
    dq, dk, dv = span_attention_bwd(
        do.contiguous(), q, k, v, o, lse, kv_start, kv_end, ctx.scale, key_keep, mask, ctx.softcap, dlse.contiguous()
    )
    return dq, dk, dv, None, None, None, None, None, None


span_attention_fwd.register_autograd(_span_attention_backward, setup_context=_span_attention_setup)


def _check_qkv(op: str, q, k, v, key_name: str) -> None:
    for name, t in (("q", q), (key_name, k), (key_name.replace("k", "v", 1), v)):
        val.check_tensor(op, name, t)
        val.check_float(op, name, t)
        val.check_dim(op, name, t, 4, "[B, H, L, d]")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    value_name = key_name.replace("k", "v", 1)
    val.check_shape(op, value_name, v, k.shape, f"{key_name}'s shape")
    B, Hq, _, d = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{op}: {key_name} must have q's batch size {B}, got shape {tuple(k.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"{op}: head dim mismatch: q has d = {d}, {key_name} has d = {k.shape[3]}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(
            f"{op}: q's heads Hq = {Hq} must be a multiple of {key_name}'s heads Hkv = {k.shape[1]} (GQA)"
        )
    val.check_same_device(op, "q", q, **{key_name: k, value_name: v})


def _check_ranges(op: str, kv_start, kv_end, batch: int, num_queries: int, num_keys: int, device) -> None:
    if (kv_start is None) != (kv_end is None):
        raise ValueError(f"{op}: give both kv_start and kv_end, or neither (causal)")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        val.check_tensor(op, name, t)
        val.check_ids(op, name, t)
        val.check_shape(op, name, t, (batch, num_queries), "[B, Lq]: one key range per query")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}; expected one device")
    mode = val.value_check_mode(kv_start) if kv_start.numel() else None
    inside = f"{op}: key ranges must lie in [0, S = {num_keys}] with kv_start <= kv_end"
    if mode == "device":
        start, end = kv_start.long(), kv_end.long()
        val.assert_on_device((start >= 0) & (end <= num_keys) & (start <= end), inside)
    if mode != "host":
        return
    lo, hi = int(kv_start.min()), int(kv_end.max())
    if lo < 0 or hi > num_keys:
        raise ValueError(f"{inside}, got kv_start >= {lo}, kv_end <= {hi}")
    inverted = int((kv_end < kv_start).sum())
    if inverted:
        raise ValueError(f"{op}: kv_end must be >= kv_start for every query, got {inverted} queries with kv_end < kv_start")


def _check_masking(op: str, q, key_keep, mask, softcap, sinks, num_keys: int):
    """Validates the optional masking arguments; returns (key_keep, mask, softcap) as the kernels take them:
    contiguous bool key_keep, contiguous bool or float32 mask, softcap a float (0: none)."""
    B, Hq, Lq, _ = q.shape
    if key_keep is not None:
        val.check_tensor(op, "key_keep", key_keep)
        if key_keep.dtype != torch.bool:
            raise TypeError(f"{op}: key_keep must be a bool tensor (True = key kept), got {key_keep.dtype}")
        val.check_shape(op, "key_keep", key_keep, (B, num_keys), "[B, S]: one flag per key")
        val.check_same_device(op, "q", q, key_keep=key_keep)
        key_keep = key_keep.contiguous()
    if mask is not None:
        val.check_tensor(op, "mask", mask)
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"{op}: mask must be bool (True = attend) or float (added to the logits), got {mask.dtype}")
        val.check_shape(op, "mask", mask, (B, Lq, num_keys), "[B, Lq, S]: one entry per query and key")
        val.check_same_device(op, "q", q, mask=mask)
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: mask requires grad, but no gradient flows to the mask; detach it")
        mask = mask.contiguous() if mask.dtype == torch.bool else reference.floor_mask(mask).contiguous()
    if softcap is None:
        softcap = 0.0
    elif not isinstance(softcap, (int, float)) or not softcap > 0 or softcap == float("inf"):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap!r}")
    if sinks is not None:
        val.check_tensor(op, "sinks", sinks)
        val.check_float(op, "sinks", sinks)
        val.check_shape(op, "sinks", sinks, (Hq,), "[Hq]: one sink logit per query head")
        val.check_same_device(op, "q", q, sinks=sinks)
    return key_keep, mask, float(softcap)


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    key_keep: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where query i sees keys kv_start[b, i] <= j < kv_end[b, i] (build them with key_ranges).

    Args:
        q: [B, Hq, Lq, d]; k, v: [B, Hkv, S, d] with Hq a multiple of Hkv (GQA); fp32 / fp16 / bf16. Lq = S
            for self-attention over a sequence; Lq < S for new tokens against a cache (ranges index the S keys).
        kv_start, kv_end: [B, Lq] integer key ranges in [0, S]; both None means causal, the Lq queries being
            the last Lq keys (query i sees keys j < S - Lq + i + 1).
        scale: softmax scale, default d ** -0.5.
        key_keep: [B, S] bool, False drops key j for every query of row b (key padding).
        mask: [B, Lq, S], bool (False drops the pair; any pattern) or float (added to the logits, like SDPA's
            float attn_mask; values below -1e30 count as -1e30, see reference.attention.MASK_FLOOR). The kernels visit only the keys inside each query's range, so give the ranges of
            the mask as well (their bounding range per query) to skip work.
        softcap: logits become softcap * tanh(logit / softcap) before the mask is added (Gemma 2).
        sinks: [Hq] float, one extra logit per query head in every softmax's denominator (gpt-oss's s_aux).
        return_lse: also return each query's softmax statistics, the log-sum-exp of its logits ([B, Hq, Lq] fp32,
            the sink included; -inf for a query that attends nothing). With it, softmax probabilities are one
            exponential each (fastmm.ops.attention_importance) and never need a [Lq, S] tensor.

    Returns:
        [B, Hq, Lq, d] in q's dtype; a query that attends no key gets zeros. Math in fp32. With return_lse,
        (output, lse).
    """
    op = "span_attention"
    _check_qkv(op, q, k, v, "k")
    B, _, L, d = q.shape
    S = k.shape[2]
    if L > S:
        raise ValueError(f"{op}: q has more queries (Lq = {L}) than k has keys (S = {S}); expected Lq <= S")
    if kv_start is None and kv_end is None:
        kv_start, kv_end = reference.causal_ranges(B, L, S, q.device)  # valid by construction: nothing to check
    else:
        _check_ranges(op, kv_start, kv_end, B, L, S, q.device)
    key_keep, mask, softcap = _check_masking(op, q, key_keep, mask, softcap, sinks, S)
    scale = float(d**-0.5 if scale is None else scale)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), kv_start.int().contiguous(), kv_end.int().contiguous())
    o, lse = span_attention_fwd(*args, scale, key_keep, mask, softcap)
    if sinks is not None:
        o = reference.with_sinks(o, lse, sinks)
        lse = torch.logaddexp(lse, sinks.float()[None, :, None])
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------- decode_attention


@kernel_op("attention", "decode_attention")
def decode_attention_fwd(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, scale: float, mask: Optional[Tensor], softcap: float
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    scale: Optional[float] = None,
    *,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The newest Lq tokens (already written into the cache) attend the valid part of a static KV cache.

    Args:
        q: [B, Hq, Lq, d], Lq = 1 for one decode step (a few for speculative / multi-token steps).
        k_cache, v_cache: [B, Hkv, S, d] static buffers; Hq a multiple of Hkv.
        cache_len: [B] integer valid lengths on q's device (Lq <= cache_len <= S); query i of row b sees
            keys j < cache_len[b] - Lq + i + 1. Never read on the host for CUDA tensors (no sync per step,
            graph-capturable); checked on the CPU.
        scale: default d ** -0.5.
        mask: [B, Lq, S], bool (False also drops the pair: key padding, left-padded prompts) or float (added
            to the logits), on top of the cache-length rule.
        softcap, sinks: as in span_attention.

    Returns:
        [B, Hq, Lq, d] in q's dtype (zeros for a query that attends no key).
    """
    op = "decode_attention"
    _check_qkv(op, q, k_cache, v_cache, "k_cache")
    B, _, Lq, d = q.shape
    S = k_cache.shape[2]
    val.check_tensor(op, "cache_len", cache_len)
    val.check_ids(op, "cache_len", cache_len)
    val.check_shape(op, "cache_len", cache_len, (B,), "[B]: valid cache length per row")
    val.check_same_device(op, "q", q, cache_len=cache_len)
    # On CUDA, reading cache_len would sync the host at every decode step: the triton kernel clamps the lengths
    # to [0, S] instead (a length below Lq only empties rows). On the CPU the check costs nothing.
    if cache_len.numel() and cache_len.device.type == "cpu" and val.values_checkable(cache_len):
        lo, hi = (int(bound) for bound in torch.aminmax(cache_len))
        if lo < Lq or hi > S:
            raise ValueError(
                f"{op}: cache_len must be in [Lq = {Lq}, S = {S}] (the queries are the last Lq cached tokens), "
                f"got values in [{lo}, {hi}]"
            )
    _, mask, softcap = _check_masking(op, q, None, mask, softcap, sinks, S)
    scale = float(d**-0.5 if scale is None else scale)
    args = (q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), cache_len.int().contiguous())
    o, lse = decode_attention_fwd(*args, scale, mask, softcap)
    return o if sinks is None else reference.with_sinks(o, lse, sinks)
