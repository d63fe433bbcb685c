"""Reference semantics of the `attention` family: key ranges, span attention and decode attention.

Every mask of a unified model is one key range per query (KERNELS.md "attention"):

    query i may attend key j  <=>  kv_start[i] <= j < kv_end[i]

For a document holding text, a 3-token image span and more text (1 = attend):

            keys ->  t0 i1 i2 i3 t4
        t0           1  0  0  0  0     causal text: [doc start, i + 1)
        i1           1  1  1  1  0     image token: [doc start, span end): the whole image and the past
        i2           1  1  1  1  0
        i3           1  1  1  1  0
        t4           1  1  1  1  1

A query with an empty range (kv_start == kv_end) outputs zeros and its log-sum-exp is -inf.

The spec functions (``key_ranges``, ``span_attention``, ``decode_attention``) compute densely in fp32 and
define the ops; the kernel-level functions at the bottom are the interface every backend module
(fastmm.<backend>.attention) implements.
"""

from __future__ import annotations

from typing import Sequence

import torch


# ------------------------------------------------------------------------------------------ key ranges


def _run_bounds(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For [B, L] labels, the start and the end (exclusive) of the maximal run of equal labels holding each
    position. int64, [B, L]."""
    B, L = labels.shape
    idx = torch.arange(L, device=labels.device).expand(B, L)
    new_run = torch.ones_like(labels, dtype=torch.bool)
    new_run[:, 1:] = labels[:, 1:] != labels[:, :-1]
    start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(dim=1).values
    run_ends = torch.ones_like(new_run)
    run_ends[:, :-1] = new_run[:, 1:]
    end_or_big = torch.where(run_ends, idx + 1, torch.full_like(idx, L))
    end = end_or_big.flip(1).cummin(dim=1).values.flip(1)
    return start, end


def span_labels(spans: Sequence[Sequence[tuple[int, int]]], length: int, device=None) -> torch.Tensor:
    """[B, L] int64: 0 outside any span, k + 1 inside the k-th (start, end) span of each row."""
    labels = torch.zeros(len(spans), length, dtype=torch.int64, device=device)
    for b, row in enumerate(spans):
        for k, (start, end) in enumerate(row):
            labels[b, start:end] = k + 1
    return labels


def key_ranges_from_labels(
    image_labels: torch.Tensor, doc_ids: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end) int32 [B, L] from image-span labels (0 = text, a run of one nonzero label = one
    span) and document ids (a run of one id = one document). Spans never reach past their document."""
    B, L = image_labels.shape
    docs = doc_ids if doc_ids is not None else torch.zeros_like(image_labels)
    doc_start, doc_end = _run_bounds(docs)
    if not causal:
        return doc_start.int(), doc_end.int()
    # a span is a run of one label inside one document: label runs split at document boundaries
    span_key = image_labels * (L + 1) + doc_start
    _, span_end = _run_bounds(span_key)
    idx = torch.arange(L, device=image_labels.device).expand(B, L)
    kv_end = torch.where(image_labels != 0, span_end, idx + 1)
    return doc_start.int(), kv_end.int()


def key_ranges(
    modality: torch.Tensor | None = None,
    spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    doc_ids: torch.Tensor | None = None,
    causal: bool = True,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec of fastmm.ops.key_ranges (inputs assumed valid): image spans from ``modality`` (every maximal run
    of nonzero ids) or from explicit ``spans``, documents from ``doc_ids``."""
    shape_source = next(t for t in (modality, doc_ids) if t is not None) if length is None else None
    B, L = shape_source.shape if shape_source is not None else (len(spans), length)
    device = shape_source.device if shape_source is not None else None
    if modality is not None:
        labels = (modality != 0).long()
    elif spans is not None:
        labels = span_labels(spans, L, device)
    else:
        labels = torch.zeros(B, L, dtype=torch.int64, device=device)
    return key_ranges_from_labels(labels, doc_ids, causal)


def causal_ranges(batch: int, num_queries: int, num_keys: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end) int32 [B, Lq] of plain causal attention for the last Lq of S keys:
    query i attends keys j < S - Lq + i + 1."""
    kv_end = torch.arange(num_keys - num_queries + 1, num_keys + 1, device=device, dtype=torch.int32)
    kv_end = kv_end.expand(batch, num_queries).contiguous()
    return torch.zeros_like(kv_end), kv_end


def dense_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, 1, L, num_keys] bool: True where query i may attend key j."""
    j = torch.arange(num_keys, device=kv_start.device)
    return ((j >= kv_start[..., None]) & (j < kv_end[..., None]))[:, None]


# ----------------------------------------------------------------------------------------- attention


def _expand_kv(t: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv, S, d] -> [B, Hq, S, d]: query head h reads kv head h // (Hq / Hkv)."""
    return t.repeat_interleave(num_q_heads // t.shape[1], dim=1)


def masked_attention(q, k, v, mask, scale):
    """Dense attention in fp32 under a boolean mask [B, 1, Lq, S]. Returns (o fp32, lse fp32 [B, Hq, Lq])."""
    qf, kf, vf = q.float(), _expand_kv(k.float(), q.shape[1]), _expand_kv(v.float(), q.shape[1])
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    probs = probs.masked_fill(~mask, 0.0)
    return probs @ vf, lse


def span_attention(q, k, v, kv_start=None, kv_end=None, scale=None):
    """Spec of fastmm.ops.span_attention: softmax(q k^T * scale + mask) v in fp32, output in q's dtype.
    No ranges: causal."""
    B, _, L, d = q.shape
    if kv_start is None:
        kv_start, kv_end = causal_ranges(B, L, L, q.device)
    return span_attention_fwd(q, k, v, kv_start, kv_end, d**-0.5 if scale is None else scale)[0]


def decode_mask(cache_len: torch.Tensor, num_queries: int, cache_size: int) -> torch.Tensor:
    """[B, 1, Lq, S] bool: the Lq queries are the last Lq valid tokens of each row, each causal:
    query i attends keys j < cache_len - Lq + i + 1."""
    i = torch.arange(num_queries, device=cache_len.device)
    kv_end = cache_len[:, None].long() - num_queries + i + 1
    return dense_mask(torch.zeros_like(kv_end), kv_end, cache_size)


def decode_attention(q, k_cache, v_cache, cache_len, scale=None):
    """Spec of fastmm.ops.decode_attention: q [B, Hq, Lq, d] against the first cache_len[b] entries of the
    caches [B, Hkv, S, d], the Lq queries being the last Lq cached tokens (causal among themselves)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return decode_attention_fwd(q, k_cache, v_cache, cache_len, scale)


# ---------------------------------------------------------------------------------- kernel interface
#
# Tensors arrive validated and contiguous: q [B, Hq, L, d]; k, v [B, Hkv, L, d] (Hq a multiple of Hkv);
# kv_start, kv_end [B, L] int32 with 0 <= kv_start <= kv_end <= L; scale a float; cache_len [B] int32 with
# Lq <= cache_len <= S.


def span_attention_fwd(q, k, v, kv_start, kv_end, scale):
    """Returns (o [B, Hq, L, d] in q's dtype, lse [B, Hq, L] fp32: log-sum-exp of the scaled scores of each
    query over its key range, -inf for an empty range)."""
    out, lse = masked_attention(q, k, v, dense_mask(kv_start, kv_end, k.shape[2]), scale)
    return out.to(q.dtype), lse


def span_attention_bwd(do, q, k, v, o, lse, kv_start, kv_end, scale):
    """Gradients of span_attention_fwd, recomputing the probabilities densely from lse (O(L^2) memory per
    head). Returns (dq, dk, dv) in the inputs' dtypes; dk, dv summed over the query heads of each kv head."""
    mask = dense_mask(kv_start, kv_end, k.shape[2])
    Hq, Hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), _expand_kv(k.float(), Hq), _expand_kv(v.float(), Hq)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min)).masked_fill(~mask, 0.0)
    dof = do.float()
    dv = probs.transpose(-1, -2) @ dof
    dprobs = dof @ vf.transpose(-1, -2)
    delta = (dof * o.float()).sum(dim=-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = (dscores @ kf) * scale
    dk = (dscores.transpose(-1, -2) @ qf) * scale

    def per_kv_head(t):  # [B, Hq, L, d] -> [B, Hkv, L, d], summing each kv head's group of query heads
        return t.view(t.shape[0], Hkv, Hq // Hkv, *t.shape[2:]).sum(dim=2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def decode_attention_fwd(q, k_cache, v_cache, cache_len, scale):
    """q [B, Hq, Lq, d]; caches [B, Hkv, S, d]; cache_len [B] int32. Returns o [B, Hq, Lq, d] in q's dtype."""
    mask = decode_mask(cache_len, q.shape[2], k_cache.shape[2])
    return masked_attention(q, k_cache, v_cache, mask, scale)[0].to(q.dtype)
