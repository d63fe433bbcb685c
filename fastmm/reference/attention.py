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


# Additive (float) masks are floored here: a value below it counts as this value, -inf stays -inf. Kernels work in
# log2 units, where transformers' finfo(float32).min would overflow to -inf and a row it masks entirely would
# attend nothing; at the floor it averages every key, as SDPA does, while -inf still drops a key exactly.
MASK_FLOOR = -1e30


def floor_mask(mask: torch.Tensor) -> torch.Tensor:
    """A float mask as fp32 with every finite value below MASK_FLOOR raised to it (see there)."""
    mask = mask.float()
    return torch.where(mask == float("-inf"), mask, mask.clamp_min(MASK_FLOOR))


def allowed_keys(kv_start, kv_end, num_keys, key_keep=None, mask=None) -> torch.Tensor:
    """[B, 1, Lq, S] bool: the keys each query attends, the intersection of its range, the kept keys
    (key_keep [B, S] bool) and a boolean mask [B, Lq, S]. A float mask is additive and masks nothing here."""
    allowed = dense_mask(kv_start, kv_end, num_keys)
    if key_keep is not None:
        allowed = allowed & key_keep[:, None, None, :]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask[:, None]
    return allowed


# ----------------------------------------------------------------------------------------- attention


def _expand_kv(t: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv, S, d] -> [B, Hq, S, d]: query head h reads kv head h // (Hq / Hkv)."""
    return t.repeat_interleave(num_q_heads // t.shape[1], dim=1)


def attention_scores(q, k, scale, softcap=0.0, mask=None) -> torch.Tensor:
    """fp32 [B, Hq, Lq, S] logits: q k^T * scale, then softcap * tanh(s / softcap) when softcap > 0 (Gemma 2),
    then + mask when the mask is additive (float [B, Lq, S])."""
    scores = (q.float() @ _expand_kv(k.float(), q.shape[1]).transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask[:, None].float()
    return scores


def masked_attention(q, k, v, mask, scale, softcap=0.0, bias=None):
    """Dense attention in fp32 under a boolean mask [B, 1, Lq, S] (and an additive float bias [B, Lq, S]).
    Returns (o fp32, lse fp32 [B, Hq, Lq]); a query that attends nothing gets o = 0 and lse = -inf."""
    scores = attention_scores(q, k, scale, softcap, bias).masked_fill(~mask, float("-inf"))
    probs = _softmax(scores, mask)
    return probs @ _expand_kv(v.float(), q.shape[1]), torch.logsumexp(scores, dim=-1)


def _softmax(scores, mask):
    """Softmax over the allowed keys, 0 on a row that allows none. Normalized by the row's sum rather than
    exp(score - lse): on a row whose logits all sit at MASK_FLOOR, lse loses log(count) to rounding."""
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(scores - row_max).masked_fill(~mask, 0.0)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def span_attention(q, k, v, kv_start=None, kv_end=None, scale=None, key_keep=None, mask=None, softcap=0.0):
    """Spec of fastmm.ops.span_attention: softmax(q k^T * scale + mask) v in fp32, output in q's dtype.
    No ranges: causal, the Lq queries being the last Lq of the S keys."""
    B, _, L, d = q.shape
    if kv_start is None:
        kv_start, kv_end = causal_ranges(B, L, k.shape[2], q.device)
    scale = d**-0.5 if scale is None else scale
    mask = mask if mask is None or mask.dtype == torch.bool else floor_mask(mask)
    return span_attention_fwd(q, k, v, kv_start, kv_end, scale, key_keep, mask, softcap)[0]


def decode_mask(cache_len: torch.Tensor, num_queries: int, cache_size: int) -> torch.Tensor:
    """[B, 1, Lq, S] bool: the Lq queries are the last Lq valid tokens of each row, each causal:
    query i attends keys j < cache_len - Lq + i + 1."""
    i = torch.arange(num_queries, device=cache_len.device)
    kv_end = cache_len[:, None].long() - num_queries + i + 1
    return dense_mask(torch.zeros_like(kv_end), kv_end, cache_size)


def decode_attention(q, k_cache, v_cache, cache_len, scale=None, mask=None, softcap=0.0):
    """Spec of fastmm.ops.decode_attention: q [B, Hq, Lq, d] against the first cache_len[b] entries of the
    caches [B, Hkv, S, d], the Lq queries being the last Lq cached tokens (causal among themselves), further
    restricted by a boolean mask or biased by a float mask [B, Lq, S]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = mask if mask is None or mask.dtype == torch.bool else floor_mask(mask)
    return decode_attention_fwd(q, k_cache, v_cache, cache_len, scale, mask, softcap)[0]


def with_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention sinks (gpt-oss): one extra logit per query head in every softmax's denominator and no value.
    softmax over [scores, sink] then dropping the sink column scales the sink-free output by
    sum / (sum + e^sink) = sigmoid(lse - sink). o [B, Hq, Lq, d], lse fp32 [B, Hq, Lq], sinks [Hq]."""
    weight = torch.sigmoid(lse - sinks.float()[None, :, None])
    return (o.float() * weight[..., None]).to(o.dtype)


def attention_weights(q, k, kv_start, kv_end, scale, key_keep=None, mask=None, softcap=0.0, sinks=None):
    """The probabilities [B, Hq, Lq, S] (q's dtype) that span_attention_fwd averages the values with, as
    transformers' eager attention returns them (sinks take their share of each row and are dropped)."""
    allowed = allowed_keys(kv_start, kv_end, k.shape[2], key_keep, mask)
    scores = attention_scores(q, k, scale, softcap, mask).masked_fill(~allowed, float("-inf"))
    allowed = allowed.expand(scores.shape)
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
        allowed = torch.cat([allowed, torch.ones_like(allowed[..., :1])], dim=-1)
    return _softmax(scores, allowed)[..., : k.shape[2]].to(q.dtype)


# ---------------------------------------------------------------------------------- kernel interface
#
# Tensors arrive validated and contiguous: q [B, Hq, Lq, d]; k, v [B, Hkv, S, d] (Hq a multiple of Hkv);
# kv_start, kv_end [B, Lq] int32 with 0 <= kv_start <= kv_end <= S; scale a float; cache_len [B] int32 with
# Lq <= cache_len <= S. Optional: key_keep [B, S] bool (False drops key j for every query of row b); mask
# [B, Lq, S], bool (False drops the pair) or float32 (added to the logits); softcap >= 0 (0: none). Query i
# attends key j iff kv_start <= j < kv_end, key_keep[j] and (a bool) mask[i, j]; its logit is
# s = q.k * scale, then softcap * tanh(s / softcap), then + mask[i, j] (a float mask, floored: see MASK_FLOOR).


def span_attention_fwd(q, k, v, kv_start, kv_end, scale, key_keep=None, mask=None, softcap=0.0):
    """Returns (o [B, Hq, Lq, d] in q's dtype, lse [B, Hq, Lq] fp32: log-sum-exp of the logits of each
    query over the keys it attends, -inf when it attends none, and then o = 0)."""
    allowed = allowed_keys(kv_start, kv_end, k.shape[2], key_keep, mask)
    out, lse = masked_attention(q, k, v, allowed, scale, softcap, mask)
    return out.to(q.dtype), lse


def span_attention_bwd(do, q, k, v, o, lse, kv_start, kv_end, scale, key_keep=None, mask=None, softcap=0.0,
                       dlse=None):  # fmt: skip
    """Gradients of span_attention_fwd, recomputing the probabilities densely (O(L^2) memory per head; lse
    is part of the interface for kernels that recompute from it). dlse [B, Hq, Lq] fp32 is the gradient reaching lse (sinks use lse), None for zero. Returns
    (dq, dk, dv) in the inputs' dtypes; dk, dv summed over the query heads of each kv head."""
    allowed = allowed_keys(kv_start, kv_end, k.shape[2], key_keep, mask)
    Hq, Hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), _expand_kv(k.float(), Hq), _expand_kv(v.float(), Hq)
    raw = (qf @ kf.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(raw / softcap) if softcap else raw
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask[:, None].float()
    probs = _softmax(scores.masked_fill(~allowed, float("-inf")), allowed)
    dof = do.float()
    dv = probs.transpose(-1, -2) @ dof
    dprobs = dof @ vf.transpose(-1, -2)
    # d lse / d s = p, so a gradient on lse shifts every row's delta (the softmax's row term) by -dlse
    delta = (dof * o.float()).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float()[..., None]
    dscores = probs * (dprobs - delta)
    if softcap:  # d/ds of softcap * tanh(s / softcap) = 1 - tanh^2
        dscores = dscores * (1 - torch.tanh(raw / softcap) ** 2)
    dq = (dscores @ kf) * scale
    dk = (dscores.transpose(-1, -2) @ qf) * scale

    def per_kv_head(t):  # [B, Hq, S, d] -> [B, Hkv, S, d], summing each kv head's group of query heads
        return t.view(t.shape[0], Hkv, Hq // Hkv, *t.shape[2:]).sum(dim=2)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def decode_attention_fwd(q, k_cache, v_cache, cache_len, scale, mask=None, softcap=0.0):
    """q [B, Hq, Lq, d]; caches [B, Hkv, S, d]; cache_len [B] int32; mask [B, Lq, S] bool / float32 or None.
    Returns (o [B, Hq, Lq, d] in q's dtype, lse [B, Hq, Lq] fp32) as span_attention_fwd does."""
    allowed = decode_mask(cache_len, q.shape[2], k_cache.shape[2])
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask[:, None]
    out, lse = masked_attention(q, k_cache, v_cache, allowed, scale, softcap, mask)
    return out.to(q.dtype), lse
