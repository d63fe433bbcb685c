"""Triton kernels of span attention (fastmm.ops.span_attention), forward and backward.

Inputs arrive validated and contiguous from fastmm.ops.attention (see fastmm.triton.attention). Layout of the
launch configurations:

Forward (flash-attention 2): one program per (query tile of BLOCK_M, b * Hq + h). The
program loads its queries' ranges and loops only over the key tiles of [min kv_start, max kv_end): tiles
outside every range are never read. That interval splits into three runs of BLOCK_N tiles:

    [first tile, full_lo)    partial: range masked per (query, key)
    [full_lo, full_hi)       inside every query's range: no range mask (the causal diagonal's left, an image span)
    [full_hi, max kv_end)    partial: range masked

key_keep and the mask apply on every tile of the three runs. Logits are kept in log2 units for exp2 (the
scale, the softcap's output and a float mask converted on the way); the online softmax is fp32, rows that
have seen only -inf logits stay at m = -inf without NaN, and the output is normalized once at the end.
Query tiles run longest first (the causal tail is the heaviest). fp16 / bf16 multiply on tensor cores, fp32
inputs with tf32x3 (see _shared.dot); fp32 accumulation.

Backward (flash-attention 2, no atomics), two launches. dq: one program per (query tile,
b * Hq + h) over the same three runs of key tiles as the forward, also writing delta = rowsum(do * o) - dlse
for its rows (dlse: the gradient reaching lse). Then dk / dv: one program per (key tile, b * Hkv + kv head)
that scans its row's key ranges for the run of queries attending its keys and loops over those query tiles
for every query head of its GQA group, summing dk and dv over the group in registers; a per-tile flag skips
the range mask on query tiles whose every range holds the whole key tile.
Both recompute p = exp2(logit - lse) from the forward's lse, except under a float mask: a row whose logits
all sit near the mask floor (-1e30) has an lse that lost log(count) to rounding (and even moderate masks
such as -1e4 lose digits in lse's round trip through natural-log units), so there the dq kernel first
recomputes each row's max and sum exactly as the forward did, uses them, and writes them for dk / dv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmm import backend
from fastmm.reference import attention as reference
from fastmm.triton._attention_blocks import (
    _LOG2E, _Launch, _MASK_FLOAT, _Masking, _apply_masks, _attend_key_tiles, _attention_aot_configs, _block_d,
    _cap, _key_mask, _logits, _softmax_step, _tiles, _too_wide,
)
from fastmm.triton._shared import cast, dot
from fastmm.triton.aot import register_aot

# Forward tiles per (element bytes, BLOCK_D), the largest that compile without spills on sm_80 and sm_90
# (ptxas's 255-register ceiling binds first on sm_80). fp16 / bf16: 128 query rows over 8 warps, 64-key
# tiles at BLOCK_D = 64 (193 registers; 4 warps spill) and 32-key tiles at BLOCK_D = 128 (187; 64 keys
# spill). tf32x3 holds both TF32 halves of every fp32 operand in registers, so fp32 runs far smaller tiles:
# 64 x 16 at BLOCK_D = 64, 32 x 32 over 8 warps at BLOCK_D = 128 (at the ceiling with no spill).
_FWD_LAUNCH = {
    (2, 64): _Launch(block_m=128, block_n=64, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=128, block_n=32, num_warps=8, num_stages=3),
    (4, 64): _Launch(block_m=64, block_n=16, num_warps=4, num_stages=2),
    (4, 128): _Launch(block_m=32, block_n=32, num_warps=8, num_stages=2),
}

# Backward tiles, again the largest found spill-free on both targets. dq mirrors the forward but also holds
# do and the transposed v tile: 128 x 32 at BLOCK_D = 64 (248 registers on sm_80), 64 x 64 at 128; fp32
# 32 x 16 and 16 x 32. dk / dv keeps k, v and both accumulators for BLOCK_N keys and streams BLOCK_M
# queries: 128 keys x 16 queries at BLOCK_D = 64, 64 x 32 at 128 (wider key tiles spill); fp32 32 keys x
# 16 queries at 64, 16 x 32 at 128.
_DQ_LAUNCH = {
    (2, 64): _Launch(block_m=128, block_n=32, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=64, block_n=64, num_warps=8, num_stages=3),
    (4, 64): _Launch(block_m=32, block_n=16, num_warps=4, num_stages=2),
    (4, 128): _Launch(block_m=16, block_n=32, num_warps=4, num_stages=2),
}
_DKDV_LAUNCH = {
    (2, 64): _Launch(block_m=16, block_n=128, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=32, block_n=64, num_warps=8, num_stages=3),
    (4, 64): _Launch(block_m=16, block_n=32, num_warps=4, num_stages=2),
    (4, 128): _Launch(block_m=32, block_n=16, num_warps=8, num_stages=2),
}
_RANGE_SCAN = 256  # queries per step of the dk / dv kernel's scan for the query rows that meet its keys

# Tiles of launches with key_keep, a mask or a softcap (every variant of _MASKING_VARIANTS but the plain one),
# the largest found spill-free on both targets for all of those variants. A [BLOCK_M, BLOCK_N] mask tile is
# loaded in a coalesced layout, not the logits' MMA layout, and Triton then carries the online softmax in
# both layouts: with the plain tiles, masked variants spill. fp16 / bf16 keep their query tiles and narrow
# the key tiles (16 keys in the forward, dq at BLOCK_D = 64, 64 in dk / dv); fp32 goes down to 16 x 16 in dq,
# and at BLOCK_D = 128 its dq spills even there: masked fp32 backward passes with heads wider than 64 run the
# reference (no entry below, see span_attention_bwd).
_FWD_LAUNCH_MASKED = {
    (2, 64): _Launch(block_m=128, block_n=16, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=128, block_n=16, num_warps=8, num_stages=3),
    (4, 64): _Launch(block_m=32, block_n=16, num_warps=4, num_stages=1),
    (4, 128): _Launch(block_m=16, block_n=32, num_warps=4, num_stages=1),
}
_DQ_LAUNCH_MASKED = {
    (2, 64): _Launch(block_m=128, block_n=16, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=64, block_n=32, num_warps=8, num_stages=3),
    (4, 64): _Launch(block_m=16, block_n=16, num_warps=8, num_stages=2),
}
_DKDV_LAUNCH_MASKED = {
    (2, 64): _Launch(block_m=16, block_n=64, num_warps=8, num_stages=3),
    (2, 128): _Launch(block_m=16, block_n=64, num_warps=8, num_stages=3),
    (4, 64): _DKDV_LAUNCH[4, 64],
}


@triton.jit
def _query_ranges(KV_START_ROW, KV_END_ROW, offs_m, row_mask, S):
    """The key ranges of a tile's queries, clamped to [0, S]: they are validated outside graph capture and
    compilation only, and no range may address past the keys. Rows past Lq get the empty range [S, 0), so they
    never lower the tile's first key nor raise its last."""
    q_start = tl.load(KV_START_ROW + offs_m, mask=row_mask, other=S)
    q_end = tl.load(KV_END_ROW + offs_m, mask=row_mask, other=0)
    return tl.minimum(tl.maximum(q_start, 0), S), tl.minimum(tl.maximum(q_end, 0), S)


@triton.jit
def _key_tile_bounds(q_start, q_end, row_mask, S, BLOCK_N: tl.constexpr):
    """(first, full_lo, full_hi, hi) for a query tile: its queries need keys [first, hi) (first rounded down
    to a tile), and the whole tiles of [full_lo, full_hi) lie inside every real query's range. Rows past Lq
    must carry the empty range [S, 0). Masked runs: [first, full_lo) and [full_hi, hi)."""
    hi = tl.max(q_end, axis=0)
    first = tl.min(q_start, axis=0) // BLOCK_N * BLOCK_N
    # Every tile of [first, full_lo) starts below the largest kv_start <= hi: no tile past hi is visited.
    full_lo = tl.cdiv(tl.max(tl.where(row_mask, q_start, 0), axis=0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.min(tl.where(row_mask, q_end, S), axis=0) // BLOCK_N * BLOCK_N, full_lo)
    return first, full_lo, full_hi, hi


@triton.jit
def _normalize(acc, m_i, l_i):
    """(acc / l, lse in natural-log units); o = 0 and lse = -inf for a row that attended no key."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln 2
    return acc / l_safe[:, None], lse


# ----------------------------------------------------------------------------------------------------
# Span attention forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _span_attention_fwd_kernel(
    Q,  # [B, Hq, Lq, d]
    K,  # [B, Hkv, S, d]
    V,  # [B, Hkv, S, d]
    KV_START,  # [B, Lq] int32 first key of each query's range
    KV_END,  # [B, Lq] int32 end (exclusive) of each query's range
    KEY_KEEP,  # [B, S] uint8, 0 drops the key (read when HAS_KEY_KEEP)
    MASK,  # [B, Lq, S] uint8 (0 drops the pair) or fp32 (added to the logits), per MASK_KIND
    O,  # [B, Hq, Lq, d] output, Q's dtype
    LSE,  # [B, Hq, Lq] fp32 log-sum-exp of each query's logits (-inf: no key attended)
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_o_b,
    stride_o_h,
    stride_o_l,
    stride_range_b,  # KV_START and KV_END share one layout
    stride_keep_b,
    stride_mask_b,
    stride_mask_q,
    stride_lse_b,
    stride_lse_h,
    num_q_heads,  # Hq
    group,  # Hq // Hkv: query heads per kv head
    num_queries,  # Lq
    num_keys,  # S
    head_dim,  # d (the last dimension of every [.., d] tensor has unit stride)
    qk_scale,  # softmax scale * log2(e): logits in log2 units for exp2
    cap_in,  # scale / softcap (read when SOFTCAP)
    cap_out,  # softcap * log2(e) (read when SOFTCAP)
    BLOCK_M: tl.constexpr,  # queries per program, from _FWD_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per tile, from _FWD_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
    HAS_KEY_KEEP: tl.constexpr,  # key_keep given
    MASK_KIND: tl.constexpr,  # _MASK_NONE, _MASK_BOOL or _MASK_FLOAT
    SOFTCAP: tl.constexpr,  # softcap > 0
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest query tiles (causal tail) first
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_head = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_start, q_end = _query_ranges(
        KV_START + b * stride_range_b, KV_END + b * stride_range_b, offs_m, row_mask, num_keys
    )  # fmt: skip
    first, full_lo, full_hi, hi = _key_tile_bounds(q_start, q_end, row_mask, num_keys, BLOCK_N)

    q = tl.load(
        Q + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    k_head = K + b * stride_k_b + kv_head * stride_k_h
    v_head = V + b * stride_v_b + kv_head * stride_v_h
    keep_row = KEY_KEEP + b * stride_keep_b
    mask_rows = MASK + b * stride_mask_b + offs_m[:, None] * stride_mask_q
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, first, full_lo, hi, q_start, q_end, row_mask,
        keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, True, HAS_KEY_KEEP,
        MASK_KIND, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, full_lo, full_hi, hi, q_start, q_end, row_mask,
        keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, False, HAS_KEY_KEEP,
        MASK_KIND, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, full_hi, hi, hi, q_start, q_end, row_mask,
        keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, True, HAS_KEY_KEEP,
        MASK_KIND, SOFTCAP,
    )  # fmt: skip

    o, lse = _normalize(acc, m_i, l_i)
    o_ptrs = O + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l + offs_d[None, :]
    tl.store(o_ptrs, cast(o, O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + b * stride_lse_b + h * stride_lse_h + offs_m, lse, mask=row_mask)


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
    """Attention of query i over keys kv_start[b, i] <= j < kv_end[b, i] that key_keep keeps and a bool mask
    allows, logits softcapped and then biased by a float mask. q [B, Hq, Lq, d]; k, v [B, Hkv, S, d];
    kv_start, kv_end [B, Lq] int32; key_keep [B, S] bool; mask [B, Lq, S] bool or fp32; softcap 0 for none.

    Returns (o [B, Hq, Lq, d] in q's dtype, lse [B, Hq, Lq] fp32), with o = 0 and lse = -inf for a query that
    attends no key.
    """
    B, Hq, Lq, d = q.shape
    S = k.shape[2]
    if _too_wide("span_attention", d):
        return reference.span_attention_fwd(q, k, v, kv_start, kv_end, scale, key_keep, mask, softcap)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    masking = _Masking.of(q, key_keep, mask, scale, softcap)
    block_d = _block_d(d)
    launch = _tiles(_FWD_LAUNCH, _FWD_LAUNCH_MASKED, q.element_size(), block_d, masking.constexprs)
    grid = (triton.cdiv(Lq, launch.block_m), B * Hq)
    _span_attention_fwd_kernel[grid](
        q, k, v, kv_start, kv_end, masking.key_keep, masking.mask, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], kv_start.stride(0),
        masking.stride_keep_b, masking.stride_mask_b, masking.stride_mask_q, *lse.stride()[:2],
        Hq, Hq // k.shape[1], Lq, S, d, scale * _LOG2E, masking.cap_in, masking.cap_out,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d, **masking.constexprs,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return o, lse


# ----------------------------------------------------------------------------------------------------
# Span attention backward: dq (with delta = rowsum(do * o) - dlse), then dk / dv
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(
    q, K, stride_k_key, tile_lo, key_end, q_start, q_end, row_mask, keep_row, mask_rows, d_mask, qk_scale, cap_in,
    cap_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """(max, sum of exp2(logit - max)) of each query's logits over keys [tile_lo, key_end), log2 units: the
    forward's statistics without its values, in one masked run (they are needed under float masks only)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(tile_lo, key_end, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < key_end
        k_t = tl.load(
            K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=d_mask[:, None] & key_mask[None, :], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        scores, _ = _logits(
            q, k_t, keys, key_mask, q_start, q_end, row_mask, keep_row, mask_rows, qk_scale, cap_in, cap_out,
            BLOCK_M, True, HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
        )  # fmt: skip
        _, _, m_i, l_i = _softmax_step(scores, m_i, l_i, True)
    return m_i, l_i


@triton.jit
def _dq_key_tiles(
    dq,  # [BLOCK_M, BLOCK_D] fp32 running sum of ds @ k (natural-log units, scale not yet applied)
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype
    do,  # [BLOCK_M, BLOCK_D] gradient of the output, input dtype
    shift,  # [BLOCK_M] fp32 p = exp2(logit - shift) (* inv_sum): lse or the row max, log2 units (+inf: no key)
    inv_sum,  # [BLOCK_M] fp32 1 / the row's sum, read under a float mask only (shift is then the row max)
    delta,  # [BLOCK_M] fp32 rowsum(do * o) - dlse
    K,  # [keys, d] this kv head's keys
    V,  # [keys, d] this kv head's values
    stride_k_key,
    stride_v_key,
    tile_lo,
    tile_hi,
    key_end,
    q_start,
    q_end,
    row_mask,
    keep_row,
    mask_rows,
    d_mask,
    qk_scale,
    cap_in,
    cap_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,  # as in _attend_key_tiles
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        keys = start_n + offs_n
        key_mask = _key_mask(keys, key_end, BLOCK_N, MASKED)
        kv_mask = d_mask[:, None] & key_mask[None, :]
        k_t = tl.load(K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=kv_mask, other=0.0)  # [D, N]
        v_t = tl.load(V + offs_d[:, None] + keys[None, :] * stride_v_key, mask=kv_mask, other=0.0)  # [D, N]
        scores, t = _logits(
            q, k_t, keys, key_mask, q_start, q_end, row_mask, keep_row, mask_rows, qk_scale, cap_in, cap_out,
            BLOCK_M, MASKED, HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
        )  # fmt: skip
        p = tl.math.exp2(scores - shift[:, None])
        if MASK_KIND == _MASK_FLOAT:
            p *= inv_sum[:, None]
        dp = dot(do, v_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds *= 1.0 - t * t
        dq = dot(cast(ds, k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _lse_log2(lse):
    """Forward log-sum-exp in log2 units, +inf where it is -inf (no key): exp2(score - it) is then 0, not NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)


@triton.jit
def _span_attention_bwd_dq_kernel(
    Q,  # [B, Hq, Lq, d]
    K,  # [B, Hkv, S, d]
    V,  # [B, Hkv, S, d]
    O,  # [B, Hq, Lq, d] forward output
    DO,  # [B, Hq, Lq, d] gradient of O
    LSE,  # [B, Hq, Lq] fp32 forward log-sum-exp (not read under a float mask)
    DLSE,  # [B, Hq, Lq] fp32 gradient of LSE
    KV_START,  # [B, Lq] int32
    KV_END,  # [B, Lq] int32
    KEY_KEEP,  # [B, S] uint8 (read when HAS_KEY_KEEP)
    MASK,  # [B, Lq, S] uint8 or fp32, per MASK_KIND
    DQ,  # [B, Hq, Lq, d] out, Q's dtype
    DELTA,  # [B, Hq, Lq] fp32 out: rowsum(do * o) - dlse, read by the dk / dv kernel
    ROW_MAX,  # [B, Hq, Lq] fp32 out under a float mask: each row's max logit, log2 units (+inf: no key)
    ROW_SUM,  # [B, Hq, Lq] fp32 out under a float mask: each row's sum of exp2(logit - max) (1: no key)
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_range_b,
    stride_keep_b,
    stride_mask_b,
    stride_mask_q,
    stride_lse_b,  # LSE, DLSE, DELTA, ROW_MAX and ROW_SUM share one layout
    stride_lse_h,
    num_q_heads,
    group,
    num_queries,  # Lq
    num_keys,  # S
    head_dim,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale: dq = scale * ds @ k
    cap_in,  # scale / softcap
    cap_out,  # softcap * log2(e)
    BLOCK_M: tl.constexpr,  # queries per program, from _DQ_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per tile, from _DQ_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Q, O, DO and DQ share one layout (all contiguous [B, Hq, Lq, d]): one set of strides.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_head = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_start, q_end = _query_ranges(
        KV_START + b * stride_range_b, KV_END + b * stride_range_b, offs_m, row_mask, num_keys
    )  # fmt: skip
    first, full_lo, full_hi, hi = _key_tile_bounds(q_start, q_end, row_mask, num_keys, BLOCK_N)

    rows = b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l + offs_d[None, :]
    tile_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + rows, mask=tile_mask, other=0.0)
    do = tl.load(DO + rows, mask=tile_mask, other=0.0)
    o = tl.load(O + rows, mask=tile_mask, other=0.0)
    lse_ptrs = b * stride_lse_b + h * stride_lse_h + offs_m
    # d lse / d logit = p: a gradient on lse shifts the softmax's row term
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1) - tl.load(DLSE + lse_ptrs, mask=row_mask, other=0.0)
    tl.store(DELTA + lse_ptrs, delta, mask=row_mask)

    k_head = K + b * stride_k_b + kv_head * stride_k_h
    v_head = V + b * stride_v_b + kv_head * stride_v_h
    keep_row = KEY_KEEP + b * stride_keep_b
    mask_rows = MASK + b * stride_mask_b + offs_m[:, None] * stride_mask_q
    if MASK_KIND == _MASK_FLOAT:
        m_i, l_i = _row_stats(
            q, k_head, stride_k_s, first, hi, q_start, q_end, row_mask, keep_row, mask_rows, d_mask, qk_scale, cap_in,
            cap_out, BLOCK_M, BLOCK_N, BLOCK_D, HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
        )  # fmt: skip
        empty = l_i == 0.0
        shift = tl.where(empty, float("inf"), m_i)
        l_i = tl.where(empty, 1.0, l_i)
        tl.store(ROW_MAX + lse_ptrs, shift, mask=row_mask)
        tl.store(ROW_SUM + lse_ptrs, l_i, mask=row_mask)
        inv_sum = 1.0 / l_i
    else:
        shift = _lse_log2(tl.load(LSE + lse_ptrs, mask=row_mask, other=float("-inf")))
        inv_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_key_tiles(
        dq, q, do, shift, inv_sum, delta, k_head, v_head, stride_k_s, stride_v_s, first, full_lo, hi, q_start, q_end,
        row_mask, keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, True,
        HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
    )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, shift, inv_sum, delta, k_head, v_head, stride_k_s, stride_v_s, full_lo, full_hi, hi, q_start,
        q_end, row_mask, keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, False,
        HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
    )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, shift, inv_sum, delta, k_head, v_head, stride_k_s, stride_v_s, full_hi, hi, hi, q_start, q_end,
        row_mask, keep_row, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, True,
        HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
    )  # fmt: skip
    tl.store(DQ + rows, cast(dq * scale, DQ.dtype.element_ty), mask=tile_mask)


@triton.jit
def _query_rows_meeting(KV_START, KV_END, key_lo, key_hi, num_queries, SCAN: tl.constexpr):
    """[row_lo, row_hi): the first and past-the-last query whose non-empty range meets keys [key_lo, key_hi)
    (row_lo >= row_hi when none does). Reads the whole row's ranges, SCAN at a time: 8 bytes per query."""
    row_lo = num_queries
    row_hi = tl.zeros((), dtype=tl.int32)
    offs = tl.arange(0, SCAN)
    for start in range(0, num_queries, SCAN):
        rows = start + offs
        valid = rows < num_queries
        q_start = tl.load(KV_START + rows, mask=valid, other=0)
        q_end = tl.load(KV_END + rows, mask=valid, other=0)
        meets = (q_start < key_hi) & (q_end > key_lo) & (q_start < q_end)
        row_lo = tl.minimum(row_lo, tl.min(tl.where(meets, rows, num_queries), axis=0))
        row_hi = tl.maximum(row_hi, tl.max(tl.where(meets, rows + 1, 0), axis=0))
    return row_lo, row_hi


@triton.jit
def _span_attention_bwd_dkdv_kernel(
    Q,  # [B, Hq, Lq, d]
    K,  # [B, Hkv, S, d]
    V,  # [B, Hkv, S, d]
    DO,  # [B, Hq, Lq, d] gradient of the output
    LSE,  # [B, Hq, Lq] fp32 forward log-sum-exp (not read under a float mask)
    DELTA,  # [B, Hq, Lq] fp32 rowsum(do * o) - dlse from the dq kernel
    ROW_MAX,  # [B, Hq, Lq] fp32 from the dq kernel, read under a float mask only
    ROW_SUM,  # [B, Hq, Lq] fp32 likewise
    KV_START,  # [B, Lq] int32
    KV_END,  # [B, Lq] int32
    KEY_KEEP,  # [B, S] uint8 (read when HAS_KEY_KEEP)
    MASK,  # [B, Lq, S] uint8 or fp32, per MASK_KIND
    DK,  # [B, Hkv, S, d] out, K's dtype: summed over the kv head's query heads
    DV,  # [B, Hkv, S, d] out, V's dtype: summed likewise
    stride_q_b,  # Q and DO share one layout
    stride_q_h,
    stride_q_l,
    stride_k_b,  # K, V, DK and DV share one layout (all contiguous [B, Hkv, S, d])
    stride_k_h,
    stride_k_s,
    stride_range_b,
    stride_keep_b,
    stride_mask_b,
    stride_mask_q,
    stride_lse_b,  # LSE, DELTA, ROW_MAX and ROW_SUM share one layout
    stride_lse_h,
    num_kv_heads,
    group,
    num_queries,  # Lq
    num_keys,  # S
    head_dim,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale: dk = scale * ds^T @ q
    cap_in,  # scale / softcap
    cap_out,  # softcap * log2(e)
    BLOCK_M: tl.constexpr,  # queries per step, from _DKDV_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per program, from _DKDV_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
    SCAN: tl.constexpr,  # queries per step of the range scan (256)
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Logits are computed transposed ([keys, queries]) so dk and dv accumulate as [BLOCK_N, BLOCK_D] rows.
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // num_kv_heads).to(tl.int64)
    kv_head = (pid_bkv % num_kv_heads).to(tl.int64)

    key_lo = pid_n * BLOCK_N
    keys = key_lo + tl.arange(0, BLOCK_N)
    key_mask = keys < num_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_rows = b * stride_k_b + kv_head * stride_k_h + keys[:, None] * stride_k_s + offs_d[None, :]
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(K + kv_rows, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_rows, mask=kv_mask, other=0.0)
    keep_ptrs = KEY_KEEP + b * stride_keep_b + keys[:, None]
    mask_keys = MASK + b * stride_mask_b + keys[:, None]

    # Only the query tiles of [row_lo, row_hi) can attend this key tile (a contiguous run for causal text,
    # images, documents and windows; any other query tile in between is masked to zero).
    range_row = b * stride_range_b
    row_lo, row_hi = _query_rows_meeting(
        KV_START + range_row, KV_END + range_row, key_lo, key_lo + BLOCK_N, num_queries, SCAN
    )  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for h in range(kv_head * group, kv_head * group + group):
        q_head = b * stride_q_b + h * stride_q_h
        lse_head = b * stride_lse_b + h * stride_lse_h
        for start_m in range(row_lo // BLOCK_M * BLOCK_M, row_hi, BLOCK_M):
            rows = start_m + offs_m
            row_mask = rows < num_queries
            q_start = tl.load(KV_START + range_row + rows, mask=row_mask, other=num_keys)
            q_end = tl.load(KV_END + range_row + rows, mask=row_mask, other=0)
            tile_mask = row_mask[:, None] & d_mask[None, :]
            q = tl.load(Q + q_head + rows[:, None] * stride_q_l + offs_d[None, :], mask=tile_mask, other=0.0)
            do = tl.load(DO + q_head + rows[:, None] * stride_q_l + offs_d[None, :], mask=tile_mask, other=0.0)
            delta = tl.load(DELTA + lse_head + rows, mask=row_mask, other=0.0)
            if MASK_KIND == _MASK_FLOAT:
                shift = tl.load(ROW_MAX + lse_head + rows, mask=row_mask, other=float("inf"))
                inv_sum = 1.0 / tl.load(ROW_SUM + lse_head + rows, mask=row_mask, other=1.0)
            else:
                shift = _lse_log2(tl.load(LSE + lse_head + rows, mask=row_mask, other=float("-inf")))

            qk_t = dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
            scores_t, t_t = _cap(qk_t, qk_scale, cap_in, cap_out, SOFTCAP)
            # A tile inside every real query's range needs no range mask (rows past Lq have p = 0 through shift).
            inside = (tl.max(tl.where(row_mask, q_start, 0), axis=0) <= key_lo) & (
                tl.min(tl.where(row_mask, q_end, num_keys), axis=0) >= key_lo + BLOCK_N
            )
            if not inside:
                in_range = (keys[:, None] >= q_start[None, :]) & (keys[:, None] < q_end[None, :])
                scores_t = tl.where(in_range, scores_t, float("-inf"))
            scores_t = _apply_masks(
                scores_t, keep_ptrs, mask_keys + rows[None, :] * stride_mask_q, key_mask[:, None],
                key_mask[:, None] & row_mask[None, :], HAS_KEY_KEEP, MASK_KIND,
            )  # fmt: skip
            p_t = tl.math.exp2(scores_t - shift[None, :])
            if MASK_KIND == _MASK_FLOAT:
                p_t *= inv_sum[None, :]
            dv = dot(cast(p_t, do.dtype), do, dv)
            dp_t = dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t *= 1.0 - t_t * t_t
            dk = dot(cast(ds_t, q.dtype), q, dk)

    tl.store(DK + kv_rows, cast(dk * scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_rows, cast(dv, DV.dtype.element_ty), mask=kv_mask)


def span_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    key_keep: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``span_attention_fwd``. do, o [B, Hq, Lq, d]; lse [B, Hq, Lq] fp32 from the forward; dlse
    [B, Hq, Lq] fp32, the gradient reaching lse (None: zero); the other arguments as the forward took them.

    Returns (dq [B, Hq, Lq, d], dk, dv [B, Hkv, S, d]) in the inputs' dtypes, dk and dv summed over the query
    heads of each kv head. Two launches, no atomics: dq per query tile (writing delta = rowsum(do * o) - dlse
    on the way), then dk / dv per key tile over the query tiles that attend it.
    """
    B, Hq, Lq, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if _too_wide("span_attention", d):
        return reference.span_attention_bwd(do, q, k, v, o, lse, kv_start, kv_end, scale, key_keep, mask, softcap, dlse)
    dq = torch.empty_like(q)
    if q.numel() == 0:  # no query heads (Hq = 0) or queries (Lq = 0) leave k and v without gradient: zeros
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    masking = _Masking.of(q, key_keep, mask, scale, softcap)
    block_d = _block_d(d)
    dq_launch = _tiles(_DQ_LAUNCH, _DQ_LAUNCH_MASKED, q.element_size(), block_d, masking.constexprs)
    dkdv_launch = _tiles(_DKDV_LAUNCH, _DKDV_LAUNCH_MASKED, q.element_size(), block_d, masking.constexprs)
    if dq_launch is None or dkdv_launch is None:
        backend.warn_fallback(
            "span_attention backward", "triton", "reference",
            f"no spill-free tiles for {q.dtype} heads of {d} with key_keep, a mask or a softcap",
        )  # fmt: skip
        return reference.span_attention_bwd(do, q, k, v, o, lse, kv_start, kv_end, scale, key_keep, mask, softcap, dlse)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    if masking.constexprs["MASK_KIND"] == _MASK_FLOAT.value:
        row_max, row_sum = torch.empty_like(delta), torch.empty_like(delta)
    else:  # not written nor read
        row_max = row_sum = delta
    group = Hq // Hkv
    masking_args = (masking.stride_keep_b, masking.stride_mask_b, masking.stride_mask_q)

    _span_attention_bwd_dq_kernel[(triton.cdiv(Lq, dq_launch.block_m), B * Hq)](
        q, k, v, o, do, lse, dlse, kv_start, kv_end, masking.key_keep, masking.mask, dq, delta, row_max, row_sum,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], kv_start.stride(0), *masking_args, *lse.stride()[:2],
        Hq, group, Lq, S, d, scale * _LOG2E, scale, masking.cap_in, masking.cap_out,
        BLOCK_M=dq_launch.block_m, BLOCK_N=dq_launch.block_n, BLOCK_D=block_d, **masking.constexprs,
        num_warps=dq_launch.num_warps, num_stages=dq_launch.num_stages,
    )  # fmt: skip
    _span_attention_bwd_dkdv_kernel[(triton.cdiv(S, dkdv_launch.block_n), B * Hkv)](
        q, k, v, do, lse, delta, row_max, row_sum, kv_start, kv_end, masking.key_keep, masking.mask, dk, dv,
        *q.stride()[:3], *k.stride()[:3], kv_start.stride(0), *masking_args, *lse.stride()[:2],
        Hkv, group, Lq, S, d, scale * _LOG2E, scale, masking.cap_in, masking.cap_out,
        BLOCK_M=dkdv_launch.block_m, BLOCK_N=dkdv_launch.block_n, BLOCK_D=block_d, SCAN=_RANGE_SCAN,
        **masking.constexprs, num_warps=dkdv_launch.num_warps, num_stages=dkdv_launch.num_stages,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

_RANGES_AND_STATS = {
    "KV_START": "*i32", "KV_END": "*i32", "LSE": "*fp32", "DLSE": "*fp32", "DELTA": "*fp32", "ROW_MAX": "*fp32",
    "ROW_SUM": "*fp32",
}  # fmt: skip
register_aot(
    _span_attention_fwd_kernel,
    _attention_aot_configs(
        _span_attention_fwd_kernel, _FWD_LAUNCH, _FWD_LAUNCH_MASKED, ("Q", "K", "V", "O"), _RANGES_AND_STATS
    ),
)  # fmt: skip
register_aot(
    _span_attention_bwd_dq_kernel,
    _attention_aot_configs(
        _span_attention_bwd_dq_kernel, _DQ_LAUNCH, _DQ_LAUNCH_MASKED, ("Q", "K", "V", "O", "DO", "DQ"),
        _RANGES_AND_STATS,
    ),
)  # fmt: skip
register_aot(
    _span_attention_bwd_dkdv_kernel,
    _attention_aot_configs(
        _span_attention_bwd_dkdv_kernel, _DKDV_LAUNCH, _DKDV_LAUNCH_MASKED, ("Q", "K", "V", "DO", "DK", "DV"),
        _RANGES_AND_STATS,
        {"SCAN": _RANGE_SCAN},
    ),
)  # fmt: skip
