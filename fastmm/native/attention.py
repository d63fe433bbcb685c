"""Native (C++ / CPU) launchers of the `attention` family: span attention and decode attention.

fastmm._C.span_attention_fwd is flash attention over per-query key ranges: query tiles (all query heads of a
kv head together) walk only the key tiles some query of the tile attends, with an online softmax in fp32 and a
mask only on tiles that cut a range; extra memory is a few tiles per thread. decode_attention_fwd streams the
cache once per kv head, split across threads and merged by log-sum-exp when there are few heads. The algorithms
are described in csrc/attention.cpp. Inputs arrive validated by fastmm.ops; the checks here keep raw pointers
in bounds when the kernels are called past it (the kernels index K and V with the range values unchecked);
views are copied to contiguous tensors first.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import DTYPE_CODE, check_contiguous, threads_for


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """q [B, Hq, Lq, d] and k [B, Hkv, S, d] with Hq a multiple of Hkv >= 1, d >= 1, in a supported dtype."""
    if q.dim() != 4 or k.dim() != 4 or q.dtype not in DTYPE_CODE:
        raise ValueError(
            f"native attention kernel: expected q and k as [B, H, L, d] float32 / float16 / bfloat16 tensors, got "
            f"q {q.dtype} shape {tuple(q.shape)} and k shape {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] or q.shape[3] < 1:
        raise ValueError(
            f"native attention kernel: expected Hq a multiple of Hkv >= 1 and head dim d >= 1, got q shape "
            f"{tuple(q.shape)} and k shape {tuple(k.shape)}"
        )


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _masking_buffers(
    key_keep: torch.Tensor | None, mask: torch.Tensor | None, batch: int, num_queries: int, num_keys: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(key_keep, allowed, bias) as the kernels read them: contiguous [B, S] bool, [B, Lq, S] bool or float32."""
    buffers = {}
    if key_keep is not None:
        key_keep = key_keep.contiguous()
        buffers["key_keep"] = (key_keep, (batch, num_keys), torch.bool)
    allowed = bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask.contiguous()
            buffers["mask"] = (allowed, (batch, num_queries, num_keys), torch.bool)
        else:
            bias = mask.contiguous()
            buffers["mask"] = (bias, (batch, num_queries, num_keys), torch.float32)
    check_contiguous("attention", **buffers)
    return key_keep, allowed, bias


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
    _check_heads(q, k)
    # torch.ops.fastmm.* can be called with views (opcheck does): copy those, the kernel reads dense rows
    q, k, v, kv_start, kv_end = (t.contiguous() for t in (q, k, v, kv_start, kv_end))
    B, Hq, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    check_contiguous("attention", q=(q, (B, Hq, L, d), q.dtype), k=(k, (B, Hkv, S, d), q.dtype),
                     v=(v, (B, Hkv, S, d), q.dtype), kv_start=(kv_start, (B, L), torch.int32),
                     kv_end=(kv_end, (B, L), torch.int32))  # fmt: skip
    key_keep, allowed, bias = _masking_buffers(key_keep, mask, B, L, S)
    if kv_start.numel() and (kv_start.min() < 0 or kv_end.max() > S or bool((kv_end < kv_start).any())):
        raise ValueError(f"native attention kernel: key ranges must satisfy 0 <= kv_start <= kv_end <= S = {S}")
    if softcap < 0:
        raise ValueError(f"native attention kernel: softcap must be >= 0, got {softcap}")
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, dtype=torch.float32)
    if o.numel():
        _C.span_attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_start.data_ptr(), kv_end.data_ptr(), o.data_ptr(),
            lse.data_ptr(), B, Hq, Hkv, L, S, d, scale, DTYPE_CODE[q.dtype], torch.get_num_threads(),
            _pointer(key_keep), _pointer(allowed), _pointer(bias), softcap,
        )  # fmt: skip
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
    _check_heads(q, k_cache)
    q, k_cache, v_cache, cache_len = (t.contiguous() for t in (q, k_cache, v_cache, cache_len))
    B, Hq, Lq, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    check_contiguous("attention", q=(q, (B, Hq, Lq, d), q.dtype), k_cache=(k_cache, (B, Hkv, S, d), q.dtype),
                     v_cache=(v_cache, (B, Hkv, S, d), q.dtype), cache_len=(cache_len, (B,), torch.int32))  # fmt: skip
    _, allowed, bias = _masking_buffers(None, mask, B, Lq, S)
    lo, hi = (int(bound) for bound in torch.aminmax(cache_len)) if cache_len.numel() else (Lq, S)
    if lo < Lq or hi > S:
        raise ValueError(f"native attention kernel: cache_len must lie in [Lq = {Lq}, S = {S}]")
    if softcap < 0:
        raise ValueError(f"native attention kernel: softcap must be >= 0, got {softcap}")
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
    if o.numel():
        _C.decode_attention_fwd(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cache_len.data_ptr(), o.data_ptr(),
            lse.data_ptr(), B, Hq, Hkv, Lq, S, d, scale, DTYPE_CODE[q.dtype], threads_for(B * Hq * Lq * S * d),
            _pointer(allowed), _pointer(bias), softcap,
        )  # fmt: skip
    return o, lse
