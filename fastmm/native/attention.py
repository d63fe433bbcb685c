"""Native (C++ / CPU) launchers of the `attention` family: span attention and decode attention.

fastmm._C.span_attention_fwd is flash attention over per-query key ranges: query tiles (all query heads of a
kv head together) walk only the key tiles some query of the tile attends, with an online softmax in fp32 and a
mask only on tiles that cut a range; extra memory is a few tiles per thread. decode_attention_fwd streams the
cache once per kv head, split across threads and merged by log-sum-exp when there are few heads. The algorithms
are described in csrc/attention.cpp. Inputs arrive validated by fastmm.ops; the kernels' entry points check
their tensors again, and the key ranges and cache lengths they index K and V with (csrc/attention.cpp), for
callers past it. Views are copied to contiguous tensors first.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import threads_for


def _masking_buffers(
    key_keep: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(key_keep, allowed, bias) as the kernels read them: contiguous, a bool mask as allowed, any other as bias."""
    key_keep = None if key_keep is None else key_keep.contiguous()
    if mask is None:
        return key_keep, None, None
    mask = mask.contiguous()
    return (key_keep, mask, None) if mask.dtype == torch.bool else (key_keep, None, mask)


def span_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    key_keep: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v with query i of row b attending keys kv_start[b, i] <= j < kv_end[b, i].

    q [B, Hq, Lq, d]; k, v [B, Hkv, S, d] in q's dtype (float32 / float16 / bfloat16), Hq a multiple of Hkv
    (query head h reads kv head h // (Hq / Hkv)); kv_start, kv_end [B, Lq] int32 with 0 <= start <= end <= S;
    key_keep [B, S] bool, mask [B, Lq, S] bool or float32 and softcap as in fastmm.reference.attention's kernel
    interface. Returns o [B, Hq, Lq, d] in q's dtype and lse [B, Hq, Lq] float32, the log-sum-exp of the logits
    each query attends (o = 0 and lse = -inf when it attends none). Math in fp32.
    """
    # torch.ops.fastmm.* can be called with views (opcheck does): copy those, the kernel reads dense rows
    q, k, v, kv_start, kv_end = (t.contiguous() for t in (q, k, v, kv_start, kv_end))
    key_keep, allowed, bias = _masking_buffers(key_keep, mask)
    B, Hq, L, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, dtype=torch.float32)
    _C.span_attention_fwd(q, k, v, kv_start, kv_end, o, lse, key_keep, allowed, bias, scale, softcap,
                          torch.get_num_threads())  # fmt: skip
    return o, lse


def decode_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lq newest cached tokens of each row attend the valid part of the cache, causal among themselves.

    q [B, Hq, Lq, d]; k_cache, v_cache [B, Hkv, S, d] in q's dtype, Hq a multiple of Hkv; cache_len [B] int32
    with Lq <= cache_len <= S. Query i of row b attends keys j < cache_len[b] - Lq + i + 1, and of those only
    the ones a bool mask [B, Lq, S] allows; a float32 mask is added to the logits. Returns o [B, Hq, Lq, d] in
    q's dtype and lse [B, Hq, Lq] float32. Math in fp32.
    """
    q, k_cache, v_cache, cache_len = (t.contiguous() for t in (q, k_cache, v_cache, cache_len))
    _, allowed, bias = _masking_buffers(None, mask)
    B, Hq, Lq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
    threads = threads_for(q.numel() * k_cache.shape[2])  # B * Hq * Lq * S * d
    _C.decode_attention_fwd(q, k_cache, v_cache, cache_len, o, lse, allowed, bias, scale, softcap, threads)
    return o, lse
