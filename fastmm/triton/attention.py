"""Triton kernels of the `attention` family: span attention (prefill) and flash-decoding over a static cache.

Every mask is one key range per query, ``kv_start[b, i] <= j < kv_end[b, i]`` (causal text, bidirectional
image spans, packed documents, sliding windows), so a kernel reads O(L) metadata instead of an L x L mask.
Semantics: ``fastmm.reference.attention`` (its kernel-interface section).

Inputs arrive validated and contiguous from ``fastmm.ops.attention``: q [B, Hq, L, d], k / v [B, Hkv, L, d]
with Hq a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)), fp32 / fp16 / bf16, int32 key ranges
and cache lengths on the device. Nothing here syncs the host: every launch is CUDA-graph capturable.

Layout of the launch configurations:
- span attention forward (flash-attention 2): one program per (query tile of BLOCK_M, b * Hq + h). The
  program loads its queries' ranges and loops only over the key tiles of [min kv_start, max kv_end): tiles
  outside every range are never read. That interval splits into three runs of BLOCK_N tiles:

      [first tile, full_lo)    partial: masked per (query, key)
      [full_lo, full_hi)       inside every query's range: no mask (the causal diagonal's left, an image span)
      [full_hi, max kv_end)    partial: masked

  Online softmax in fp32 with exp2 (the scale folded into log2 units), rows with an empty range kept at
  m = -inf without NaN, normalized once at the end. Query tiles run longest first (the causal tail is the
  heaviest). fp16 / bf16 multiply on tensor cores, fp32 inputs with tf32x3 (see _shared.dot); fp32 accumulation.
- span attention backward (flash-attention 2, no atomics), two launches. dq: one program per (query tile,
  b * Hq + h) over the same three runs of key tiles as the forward, also writing delta = rowsum(do * o) for
  its rows. Then dk / dv: one program per (key tile, b * Hkv + kv head) that scans its row's key ranges for
  the run of queries attending its keys and loops over those query tiles for every query head of its GQA
  group, summing dk and dv over the group in registers; a per-tile flag skips the mask on query tiles whose
  every range holds the whole key tile.
- decode (flash-decoding): the cache of each (b, kv head) is cut into a fixed number of splits chosen on
  the host from B * Hkv and S only (never from cache_len, which stays on the device), one program per
  (split, b * Hkv, block of 16 (query head, query) rows): the query heads of a kv head share the program, so
  each K / V tile is read once for the whole GQA group. Each program writes a partial (o, lse) in fp32; a
  second kernel merges the splits by log-sum-exp. Splits past cache_len loop zero times and write lse = -inf.

Head dims are padded to BLOCK_D = 64 or 128 with masking (every d in [1, 128] runs one of two compiled
variants); wider heads have no compiled configuration and run ``fastmm.reference.attention`` instead,
with one logged warning per op.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import triton
import triton.language as tl

from fastmm import backend
from fastmm.reference import attention as reference
from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast, dot, num_sms
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["MAX_HEAD_DIM", "decode_attention_fwd", "span_attention_bwd", "span_attention_fwd"]

# Widest head the kernels hold in registers (LLaMA / Chameleon / Emu3: 128); wider heads run the reference.
MAX_HEAD_DIM = 128
_BLOCK_DS = (64, 128)  # narrower heads pad to 64: real models use 64 to 128, so two variants cover them
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Tile sizes, warps and pipeline stages of one (dtype width, BLOCK_D) bucket."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), _BLOCK_DS[0])


def _too_wide(op: str, d: int) -> bool:
    """True (after one logged warning) when heads of d elements must go to the reference implementation."""
    if d <= MAX_HEAD_DIM:
        return False
    backend.warn_fallback(op, "triton", "reference", f"head dim {d} exceeds the compiled limit {MAX_HEAD_DIM}")
    return True


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

# Decode tiles: 16 (query head, query) rows, the smallest tensor-core tile, cover a GQA group of up to 16
# query heads at Lq = 1 (larger groups take several row blocks, each reading the kv head again). Decode is
# bound by reading the cache: 64-key tiles for 16-bit caches, 32 for fp32 (the same 8 KiB per row block
# at BLOCK_D = 64), three stages in flight.
_DECODE_ROWS = 16
_DECODE_LAUNCH = {
    (2, 64): _Launch(block_m=_DECODE_ROWS, block_n=64, num_warps=4, num_stages=3),
    (2, 128): _Launch(block_m=_DECODE_ROWS, block_n=64, num_warps=4, num_stages=3),
    (4, 64): _Launch(block_m=_DECODE_ROWS, block_n=32, num_warps=4, num_stages=3),
    (4, 128): _Launch(block_m=_DECODE_ROWS, block_n=32, num_warps=4, num_stages=3),
}
# The merge is a few hundred bytes per (b, h, query) row: one warp per row, and one BLOCK_D for every head dim
# (a masked 128-lane row costs nothing more than a 64-lane one here, and saves a compiled variant).
_MERGE_WARPS = 1
_MERGE_BLOCK_D = MAX_HEAD_DIM

# Fewest key tiles per decode split on a GPU: below 4 x 64 keys the merge's extra traffic outweighs the
# added parallelism. Under the interpreter a split may be one tile, so small tests cross split boundaries.
_MIN_SPLIT_TILES = 4


def _decode_splits(batch_kv_heads: int, S: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, split_size) cutting a cache of S keys: about two programs per SM (16 programs under the
    interpreter) over the B * Hkv kv heads, each split a whole number of key tiles. Depends on shapes only."""
    if device.type == "cuda":
        target_programs, min_tiles = 2 * num_sms(device), _MIN_SPLIT_TILES
    else:
        target_programs, min_tiles = 16, 1
    tiles = triton.cdiv(S, block_n)
    splits = min(max(triton.cdiv(target_programs, batch_kv_heads), 1), max(tiles // min_tiles, 1))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_n


# ----------------------------------------------------------------------------------------------------
# The online-softmax loop of the forward and decode kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _key_mask(keys, key_end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys of the tile that may be read: in a masked run the last tile can pass the keys (and the tensor)."""
    if MASKED:
        return keys < key_end
    return tl.full((BLOCK_N,), 1, tl.int1)


@triton.jit
def _scores(q, k_t, keys, q_start, q_end, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 q @ k_t in log2 units; when MASKED, -inf outside each query's key range."""
    scores = dot(q, k_t, tl.zeros((BLOCK_M, k_t.shape[1]), dtype=tl.float32)) * qk_scale
    if MASKED:
        in_range = (keys[None, :] >= q_start[:, None]) & (keys[None, :] < q_end[:, None])
        scores = tl.where(in_range, scores, float("-inf"))
    return scores


@triton.jit
def _attend_key_tiles(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p @ v (unnormalized)
    m_i,  # [BLOCK_M] fp32 running max of the scores, log2 units (-inf while a row has seen no key)
    l_i,  # [BLOCK_M] fp32 running sum of exp2(score - m_i)
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype (zero-padded rows and head dims)
    K,  # [keys, d] this kv head's keys (pointer to key 0)
    V,  # [keys, d] this kv head's values
    stride_k_key,
    stride_v_key,
    tile_lo,  # first key of the first tile (a multiple of BLOCK_N)
    tile_hi,  # the loop stops before this key
    key_end,  # keys at or past it are not read (no query attends them)
    q_start,  # [BLOCK_M] int32 first key of each query's range
    q_end,  # [BLOCK_M] int32 end (exclusive) of each query's range
    d_mask,  # [BLOCK_D] head dims that exist
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr,  # query rows
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # padded head dim
    MASKED: tl.constexpr,  # some tile of [tile_lo, tile_hi) is not inside every query's range
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        keys = start_n + offs_n
        key_mask = _key_mask(keys, key_end, BLOCK_N, MASKED)
        k_t = tl.load(
            K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=d_mask[:, None] & key_mask[None, :], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        scores = _scores(q, k_t, keys, q_start, q_end, qk_scale, BLOCK_M, MASKED)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_shift = m_new
        if MASKED:
            # A row that has seen no key in range keeps m = -inf: shift by 0 so p and alpha are 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + keys[:, None] * stride_v_key + offs_d[None, :], mask=key_mask[:, None] & d_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_ranges(KV_START_ROW, KV_END_ROW, offs_m, row_mask, L):
    """The key ranges of a tile's queries, clamped to [0, L]: they are validated outside graph capture and
    compilation only, and no range may address past the keys. Rows past L get the empty range [L, 0), so they
    never lower the tile's first key nor raise its last."""
    q_start = tl.load(KV_START_ROW + offs_m, mask=row_mask, other=L)
    q_end = tl.load(KV_END_ROW + offs_m, mask=row_mask, other=0)
    return tl.minimum(tl.maximum(q_start, 0), L), tl.minimum(tl.maximum(q_end, 0), L)


@triton.jit
def _key_tile_bounds(q_start, q_end, row_mask, L, BLOCK_N: tl.constexpr):
    """(first, full_lo, full_hi, hi) for a query tile: its queries need keys [first, hi) (first rounded down
    to a tile), and the whole tiles of [full_lo, full_hi) lie inside every real query's range. Rows past L
    must carry the empty range [L, 0). Masked runs: [first, full_lo) and [full_hi, hi)."""
    hi = tl.max(q_end, axis=0)
    first = tl.min(q_start, axis=0) // BLOCK_N * BLOCK_N
    # Every tile of [first, full_lo) starts below the largest kv_start <= hi: no tile past hi is visited.
    full_lo = tl.cdiv(tl.max(tl.where(row_mask, q_start, 0), axis=0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.min(tl.where(row_mask, q_end, L), axis=0) // BLOCK_N * BLOCK_N, full_lo)
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
    Q,  # [B, Hq, L, d]
    K,  # [B, Hkv, L, d]
    V,  # [B, Hkv, L, d]
    KV_START,  # [B, L] int32 first key of each query's range
    KV_END,  # [B, L] int32 end (exclusive) of each query's range
    O,  # [B, Hq, L, d] output, Q's dtype
    LSE,  # [B, Hq, L] fp32 log-sum-exp of each query's scaled scores (-inf: empty range)
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_l,
    stride_v_b,
    stride_v_h,
    stride_v_l,
    stride_o_b,
    stride_o_h,
    stride_o_l,
    stride_range_b,  # KV_START and KV_END share one layout
    stride_lse_b,
    stride_lse_h,
    num_q_heads,  # Hq
    group,  # Hq // Hkv: query heads per kv head
    L,
    head_dim,  # d (the last dimension of every [.., d] tensor has unit stride)
    qk_scale,  # softmax scale * log2(e): scores in log2 units for exp2
    BLOCK_M: tl.constexpr,  # queries per program, from _FWD_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per tile, from _FWD_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest query tiles (causal tail) first
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_head = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < L
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_start, q_end = _query_ranges(KV_START + b * stride_range_b, KV_END + b * stride_range_b, offs_m, row_mask, L)
    first, full_lo, full_hi, hi = _key_tile_bounds(q_start, q_end, row_mask, L, BLOCK_N)

    q = tl.load(
        Q + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    k_head = K + b * stride_k_b + kv_head * stride_k_h
    v_head = V + b * stride_v_b + kv_head * stride_v_h
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_l, stride_v_l, first, full_lo, hi, q_start, q_end, d_mask,
        qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=True,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_l, stride_v_l, full_lo, full_hi, hi, q_start, q_end, d_mask,
        qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=False,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_l, stride_v_l, full_hi, hi, hi, q_start, q_end, d_mask,
        qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=True,
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
    """Attention of query i over keys kv_start[b, i] <= j < kv_end[b, i]. q [B, Hq, L, d]; k, v [B, Hkv, L, d];
    kv_start, kv_end [B, L] int32.

    Returns (o [B, Hq, L, d] in q's dtype, lse [B, Hq, L] fp32), with o = 0 and lse = -inf for an empty range.
    """
    B, Hq, L, d = q.shape
    if _too_wide("span_attention", d) or k.shape[2] != L or key_keep is not None or mask is not None or softcap:
        return reference.span_attention_fwd(q, k, v, kv_start, kv_end, scale, key_keep, mask, softcap)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    block_d = _block_d(d)
    launch = _FWD_LAUNCH[q.element_size(), block_d]
    grid = (triton.cdiv(L, launch.block_m), B * Hq)
    _span_attention_fwd_kernel[grid](
        q, k, v, kv_start, kv_end, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], kv_start.stride(0),
        *lse.stride()[:2], Hq, Hq // k.shape[1], L, d, scale * _LOG2E,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return o, lse


# ----------------------------------------------------------------------------------------------------
# Span attention backward: dq (with delta = rowsum(do * o)), then dk / dv
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dq_key_tiles(
    dq,  # [BLOCK_M, BLOCK_D] fp32 running sum of ds @ k (natural-log units, scale not yet applied)
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype
    do,  # [BLOCK_M, BLOCK_D] gradient of the output, input dtype
    lse2,  # [BLOCK_M] fp32 forward log-sum-exp in log2 units (+inf for rows without keys: p = 0)
    delta,  # [BLOCK_M] fp32 rowsum(do * o)
    K,  # [keys, d] this kv head's keys
    V,  # [keys, d] this kv head's values
    stride_k_key,
    stride_v_key,
    tile_lo,
    tile_hi,
    key_end,
    q_start,
    q_end,
    d_mask,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,  # as in _attend_key_tiles
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        keys = start_n + offs_n
        kv_mask = d_mask[:, None] & _key_mask(keys, key_end, BLOCK_N, MASKED)[None, :]
        k_t = tl.load(K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=kv_mask, other=0.0)  # [D, N]
        v_t = tl.load(V + offs_d[:, None] + keys[None, :] * stride_v_key, mask=kv_mask, other=0.0)  # [D, N]
        p = tl.math.exp2(_scores(q, k_t, keys, q_start, q_end, qk_scale, BLOCK_M, MASKED) - lse2[:, None])
        dp = dot(do, v_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        dq = dot(cast(ds, k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _lse_log2(lse):
    """Forward log-sum-exp in log2 units, +inf where it is -inf (no key): exp2(score - it) is then 0, not NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)


@triton.jit
def _span_attention_bwd_dq_kernel(
    Q,  # [B, Hq, L, d]
    K,  # [B, Hkv, L, d]
    V,  # [B, Hkv, L, d]
    O,  # [B, Hq, L, d] forward output
    DO,  # [B, Hq, L, d] gradient of O
    LSE,  # [B, Hq, L] fp32 forward log-sum-exp
    KV_START,  # [B, L] int32
    KV_END,  # [B, L] int32
    DQ,  # [B, Hq, L, d] out, Q's dtype
    DELTA,  # [B, Hq, L] fp32 out: rowsum(do * o), read by the dk / dv kernel
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_l,
    stride_v_b,
    stride_v_h,
    stride_v_l,
    stride_range_b,
    stride_lse_b,  # LSE and DELTA share one layout
    stride_lse_h,
    num_q_heads,
    group,
    L,
    head_dim,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale: dq = scale * ds @ k
    BLOCK_M: tl.constexpr,  # queries per program, from _DQ_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per tile, from _DQ_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
):
    # Q, O, DO and DQ share one layout (all contiguous [B, Hq, L, d]): one set of strides.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = (pid_bh % num_q_heads).to(tl.int64)
    kv_head = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < L
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_start, q_end = _query_ranges(KV_START + b * stride_range_b, KV_END + b * stride_range_b, offs_m, row_mask, L)
    first, full_lo, full_hi, hi = _key_tile_bounds(q_start, q_end, row_mask, L, BLOCK_N)

    rows = b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l + offs_d[None, :]
    tile_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + rows, mask=tile_mask, other=0.0)
    do = tl.load(DO + rows, mask=tile_mask, other=0.0)
    o = tl.load(O + rows, mask=tile_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse_ptrs = b * stride_lse_b + h * stride_lse_h + offs_m
    tl.store(DELTA + lse_ptrs, delta, mask=row_mask)
    lse2 = _lse_log2(tl.load(LSE + lse_ptrs, mask=row_mask, other=float("-inf")))

    k_head = K + b * stride_k_b + kv_head * stride_k_h
    v_head = V + b * stride_v_b + kv_head * stride_v_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_key_tiles(
        dq, q, do, lse2, delta, k_head, v_head, stride_k_l, stride_v_l, first, full_lo, hi, q_start, q_end,
        d_mask, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=True,
    )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, lse2, delta, k_head, v_head, stride_k_l, stride_v_l, full_lo, full_hi, hi, q_start, q_end,
        d_mask, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=False,
    )  # fmt: skip
    dq = _dq_key_tiles(
        dq, q, do, lse2, delta, k_head, v_head, stride_k_l, stride_v_l, full_hi, hi, hi, q_start, q_end,
        d_mask, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=True,
    )  # fmt: skip
    tl.store(DQ + rows, cast(dq * scale, DQ.dtype.element_ty), mask=tile_mask)


@triton.jit
def _query_rows_meeting(KV_START, KV_END, key_lo, key_hi, L, SCAN: tl.constexpr):
    """[row_lo, row_hi): the first and past-the-last query whose non-empty range meets keys [key_lo, key_hi)
    (row_lo >= row_hi when none does). Reads the whole row's ranges, SCAN at a time: 8 bytes per query."""
    row_lo = L
    row_hi = tl.zeros((), dtype=tl.int32)
    offs = tl.arange(0, SCAN)
    for start in range(0, L, SCAN):
        rows = start + offs
        valid = rows < L
        q_start = tl.load(KV_START + rows, mask=valid, other=0)
        q_end = tl.load(KV_END + rows, mask=valid, other=0)
        meets = (q_start < key_hi) & (q_end > key_lo) & (q_start < q_end)
        row_lo = tl.minimum(row_lo, tl.min(tl.where(meets, rows, L), axis=0))
        row_hi = tl.maximum(row_hi, tl.max(tl.where(meets, rows + 1, 0), axis=0))
    return row_lo, row_hi


@triton.jit
def _span_attention_bwd_dkdv_kernel(
    Q,  # [B, Hq, L, d]
    K,  # [B, Hkv, L, d]
    V,  # [B, Hkv, L, d]
    DO,  # [B, Hq, L, d] gradient of the output
    LSE,  # [B, Hq, L] fp32 forward log-sum-exp
    DELTA,  # [B, Hq, L] fp32 rowsum(do * o) from the dq kernel
    KV_START,  # [B, L] int32
    KV_END,  # [B, L] int32
    DK,  # [B, Hkv, L, d] out, K's dtype: summed over the kv head's query heads
    DV,  # [B, Hkv, L, d] out, V's dtype: summed likewise
    stride_q_b,  # Q and DO share one layout
    stride_q_h,
    stride_q_l,
    stride_k_b,  # K, V, DK and DV share one layout (all contiguous [B, Hkv, L, d])
    stride_k_h,
    stride_k_l,
    stride_range_b,
    stride_lse_b,  # LSE and DELTA share one layout
    stride_lse_h,
    num_kv_heads,
    group,
    L,
    head_dim,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale: dk = scale * ds^T @ q
    BLOCK_M: tl.constexpr,  # queries per step, from _DKDV_LAUNCH
    BLOCK_N: tl.constexpr,  # keys per program, from _DKDV_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
    SCAN: tl.constexpr,  # queries per step of the range scan (256)
):
    # Scores are computed transposed ([keys, queries]) so dk and dv accumulate as [BLOCK_N, BLOCK_D] rows.
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // num_kv_heads).to(tl.int64)
    kv_head = (pid_bkv % num_kv_heads).to(tl.int64)

    key_lo = pid_n * BLOCK_N
    keys = key_lo + tl.arange(0, BLOCK_N)
    key_mask = keys < L
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_rows = b * stride_k_b + kv_head * stride_k_h + keys[:, None] * stride_k_l + offs_d[None, :]
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(K + kv_rows, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_rows, mask=kv_mask, other=0.0)

    # Only the query tiles of [row_lo, row_hi) can attend this key tile (a contiguous run for causal text,
    # images, documents and windows; any other query tile in between is masked to zero).
    range_row = b * stride_range_b
    row_lo, row_hi = _query_rows_meeting(KV_START + range_row, KV_END + range_row, key_lo, key_lo + BLOCK_N, L, SCAN)
    offs_m = tl.arange(0, BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for h in range(kv_head * group, kv_head * group + group):
        q_head = b * stride_q_b + h * stride_q_h
        lse_head = b * stride_lse_b + h * stride_lse_h
        for start_m in range(row_lo // BLOCK_M * BLOCK_M, row_hi, BLOCK_M):
            rows = start_m + offs_m
            row_mask = rows < L
            q_start = tl.load(KV_START + range_row + rows, mask=row_mask, other=L)
            q_end = tl.load(KV_END + range_row + rows, mask=row_mask, other=0)
            tile_mask = row_mask[:, None] & d_mask[None, :]
            q = tl.load(Q + q_head + rows[:, None] * stride_q_l + offs_d[None, :], mask=tile_mask, other=0.0)
            do = tl.load(DO + q_head + rows[:, None] * stride_q_l + offs_d[None, :], mask=tile_mask, other=0.0)
            lse2 = _lse_log2(tl.load(LSE + lse_head + rows, mask=row_mask, other=float("-inf")))
            delta = tl.load(DELTA + lse_head + rows, mask=row_mask, other=0.0)

            scores_t = dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)) * qk_scale
            # A tile inside every real query's range needs no mask (rows past L have p = 0 through lse2).
            inside = (tl.max(tl.where(row_mask, q_start, 0), axis=0) <= key_lo) & (
                tl.min(tl.where(row_mask, q_end, L), axis=0) >= key_lo + BLOCK_N
            )
            if not inside:
                in_range = (keys[:, None] >= q_start[None, :]) & (keys[:, None] < q_end[None, :])
                scores_t = tl.where(in_range, scores_t, float("-inf"))
            p_t = tl.math.exp2(scores_t - lse2[None, :])
            dv = dot(cast(p_t, do.dtype), do, dv)
            dp_t = dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
            ds_t = p_t * (dp_t - delta[None, :])
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
    """Gradients of ``span_attention_fwd``. do, o [B, Hq, L, d]; lse [B, Hq, L] fp32 from the forward.

    Returns (dq [B, Hq, L, d], dk, dv [B, Hkv, L, d]) in the inputs' dtypes, dk and dv summed over the query
    heads of each kv head. Two launches, no atomics: dq per query tile (writing delta = rowsum(do * o) on
    the way), then dk / dv per key tile over the query tiles that attend it.
    """
    B, Hq, L, d = q.shape
    Hkv = k.shape[1]
    if _too_wide("span_attention", d) or k.shape[2] != L or key_keep is not None or mask is not None or softcap or dlse is not None:
        return reference.span_attention_bwd(do, q, k, v, o, lse, kv_start, kv_end, scale, key_keep, mask, softcap, dlse)
    dq = torch.empty_like(q)
    if q.numel() == 0:  # no query heads (Hq = 0) leave k and v without gradient: zeros
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    group = Hq // Hkv

    launch = _DQ_LAUNCH[q.element_size(), block_d]
    _span_attention_bwd_dq_kernel[(triton.cdiv(L, launch.block_m), B * Hq)](
        q, k, v, o, do, lse, kv_start, kv_end, dq, delta,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], kv_start.stride(0), *lse.stride()[:2],
        Hq, group, L, d, scale * _LOG2E, scale,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    launch = _DKDV_LAUNCH[q.element_size(), block_d]
    _span_attention_bwd_dkdv_kernel[(triton.cdiv(L, launch.block_n), B * Hkv)](
        q, k, v, do, lse, delta, kv_start, kv_end, dk, dv,
        *q.stride()[:3], *k.stride()[:3], kv_start.stride(0), *lse.stride()[:2],
        Hkv, group, L, d, scale * _LOG2E, scale,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d, SCAN=_RANGE_SCAN,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Decode attention: split kernel and log-sum-exp merge
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _decode_attention_split_kernel(
    Q,  # [B, Hq, Lq, d]
    K_CACHE,  # [B, Hkv, S, d]
    V_CACHE,  # [B, Hkv, S, d]
    CACHE_LEN,  # [B] int32 valid keys per row; query i attends keys j < CACHE_LEN[b] - Lq + i + 1
    O_PART,  # [B, Hq, Lq, num_splits, d] fp32 out: each split's normalized output
    LSE_PART,  # [B, Hq, Lq, num_splits] fp32 out: each split's log-sum-exp (-inf: no key in the split)
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_op_b,
    stride_op_h,
    stride_op_l,
    stride_op_split,
    stride_lp_b,
    stride_lp_h,
    stride_lp_l,
    num_kv_heads,  # Hkv
    group,  # Hq // Hkv: query heads per kv head
    num_queries,  # Lq
    cache_size,  # S
    head_dim,  # d (the last dimension of every [.., d] tensor has unit stride)
    split_size,  # keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr,  # (query head, query) rows per program: 16
    BLOCK_N: tl.constexpr,  # keys per tile, from _DECODE_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
):
    split = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // num_kv_heads).to(tl.int64)
    kv_head = (pid_bkv % num_kv_heads).to(tl.int64)

    # Row r of the group is query r % Lq of query head kv_head * group + r // Lq.
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < group * num_queries
    heads = kv_head * group + rows // num_queries
    queries = rows % num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim

    # Validated outside graph capture and compilation only: clamp so that no length can address past the cache.
    cache_len = tl.minimum(tl.maximum(tl.load(CACHE_LEN + b), 0), cache_size)
    q_end = tl.where(row_mask, cache_len - num_queries + queries + 1, 0)
    split_lo = split * split_size
    split_hi = tl.minimum(split_lo + split_size, tl.max(q_end, axis=0))
    # Whole tiles below every real row's end need no mask: [split_lo, full_hi) unmasked, then [full_hi, split_hi).
    unmasked_end = tl.min(tl.where(row_mask, q_end, cache_len), axis=0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(unmasked_end, split_hi), split_lo)

    q = tl.load(
        Q + b * stride_q_b + heads[:, None] * stride_q_h + queries[:, None] * stride_q_l + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    k_head = K_CACHE + b * stride_k_b + kv_head * stride_k_h
    v_head = V_CACHE + b * stride_v_b + kv_head * stride_v_h
    q_start = tl.zeros((BLOCK_M,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, split_lo, full_hi, split_hi, q_start, q_end,
        d_mask, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=False,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, full_hi, split_hi, split_hi, q_start, q_end,
        d_mask, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, MASKED=True,
    )  # fmt: skip

    o, lse = _normalize(acc, m_i, l_i)
    o_ptrs = (
        O_PART + b * stride_op_b + heads[:, None] * stride_op_h + queries[:, None] * stride_op_l
        + split * stride_op_split + offs_d[None, :]
    )  # fmt: skip
    tl.store(o_ptrs, o, mask=row_mask[:, None] & d_mask[None, :])
    lse_ptrs = LSE_PART + b * stride_lp_b + heads * stride_lp_h + queries * stride_lp_l + split
    tl.store(lse_ptrs, lse, mask=row_mask)


@triton.jit
def _decode_attention_merge_kernel(
    O_PART,  # [rows, num_splits, d] fp32: the split kernel's output, rows = B * Hq * Lq
    LSE_PART,  # [rows, num_splits] fp32
    O,  # [rows, d] output, Q's dtype
    stride_op_row,
    stride_op_split,
    stride_lp_row,
    stride_o_row,
    num_splits,
    head_dim,
    BLOCK_D: tl.constexpr,  # _MERGE_BLOCK_D (128) for every d
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    lse_max = tl.load(LSE_PART + row * stride_lp_row)
    for split in range(1, num_splits):
        lse_max = tl.maximum(lse_max, tl.load(LSE_PART + row * stride_lp_row + split))
    # Every query attends key 0 (cache_len >= Lq), so lse_max is finite; splits with lse = -inf weigh 0.
    total = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for split in range(num_splits):
        weight = tl.exp(tl.load(LSE_PART + row * stride_lp_row + split) - lse_max)
        o_split = tl.load(O_PART + row * stride_op_row + split * stride_op_split + offs_d, mask=d_mask, other=0.0)
        acc += weight * o_split
        total += weight
    tl.store(O + row * stride_o_row + offs_d, cast(acc / total, O.dtype.element_ty), mask=d_mask)


def decode_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last Lq cached tokens attend the cache. q [B, Hq, Lq, d]; caches [B, Hkv, S, d]; cache_len [B]
    int32 with Lq <= cache_len <= S (read on the device only). Query i attends keys j < cache_len - Lq + i + 1.

    Returns o [B, Hq, Lq, d] in q's dtype.
    """
    B, Hq, Lq, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if _too_wide("decode_attention", d) or mask is not None or softcap:
        return reference.decode_attention_fwd(q, k_cache, v_cache, cache_len, scale, mask, softcap)
    o = torch.empty_like(q)
    if o.numel() == 0:
        return o, torch.full((B, Hq, Lq), float("-inf"), device=q.device)
    block_d = _block_d(d)
    launch = _DECODE_LAUNCH[q.element_size(), block_d]
    num_splits, split_size = _decode_splits(B * Hkv, S, launch.block_n, q.device)
    o_part = torch.empty(B, Hq, Lq, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, Lq, num_splits, dtype=torch.float32, device=q.device)
    group = Hq // Hkv
    grid = (num_splits, B * Hkv, triton.cdiv(group * Lq, launch.block_m))
    _decode_attention_split_kernel[grid](
        q, k_cache, v_cache, cache_len, o_part, lse_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *o_part.stride()[:4],
        *lse_part.stride()[:3], Hkv, group, Lq, S, d, split_size, scale * _LOG2E,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    # o_part, lse_part and o are contiguous, so the (b, h, query) rows flatten with the Lq dimension's stride.
    rows = B * Hq * Lq
    _decode_attention_merge_kernel[(rows,)](
        o_part, lse_part, o, o_part.stride(2), o_part.stride(3), lse_part.stride(2), o.stride(2), num_splits, d,
        BLOCK_D=_MERGE_BLOCK_D, num_warps=_MERGE_WARPS, num_stages=1,
    )  # fmt: skip
    return o, torch.logsumexp(lse_part, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

# Integer arguments divisible by 16 at real sizes (d = 64 .. 128): every stride that is a multiple of d, the
# head dim, and the decode split size (a multiple of BLOCK_N). Strides that are multiples of L or of the
# split count only (key ranges, log-sum-exps) are not, and neither are head or query counts.
_ALIGNED = {
    "_span_attention_fwd_kernel": ("stride_q_", "stride_k_", "stride_v_", "stride_o_", "head_dim"),
    "_span_attention_bwd_dq_kernel": ("stride_q_", "stride_k_", "stride_v_", "head_dim"),
    "_span_attention_bwd_dkdv_kernel": ("stride_q_", "stride_k_", "head_dim"),
    "_decode_attention_split_kernel": (
        "stride_q_", "stride_k_", "stride_v_", "stride_op_", "head_dim", "split_size",
    ),
    "_decode_attention_merge_kernel": ("stride_op_", "stride_o_row", "head_dim"),
}  # fmt: skip


def _aot_config(kernel, label: str, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    """AotConfig with the float arguments typed fp32 and the integers of _ALIGNED marked divisible by 16."""
    signature = aot_signature(kernel, pointers, constexprs, floats=("qk_scale", "scale"))
    prefixes = _ALIGNED[kernel.fn.__name__]
    aligned = tuple(name for name, kind in signature.items() if kind == "i32" and name.startswith(prefixes))
    return AotConfig(label, signature, constexprs, num_warps, num_stages, aligned)


def _attention_aot_configs(
    kernel, launches: dict, pointer_names: tuple[str, ...], extra: dict, fixed: dict | None = None
) -> list[AotConfig]:
    """One config per (dtype, BLOCK_D) with the tiles ``launches`` gives that bucket: ``pointer_names`` in the
    input dtype, ``extra`` pointers as given, ``fixed`` constexprs beside the tile sizes."""
    configs = []
    for (torch_dtype, dtype), block_d in itertools.product(TRITON_DTYPE.items(), _BLOCK_DS):
        launch = launches[torch_dtype.itemsize, block_d]
        pointers = {name: f"*{dtype}" for name in pointer_names} | extra
        constexprs = {"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n, "BLOCK_D": block_d, **(fixed or {})}
        label = f"{dtype} {launch.block_m}x{launch.block_n}x{block_d} w{launch.num_warps} s{launch.num_stages}"
        configs.append(_aot_config(kernel, label, pointers, constexprs, launch.num_warps, launch.num_stages))
    return configs


def _merge_aot_configs() -> list[AotConfig]:
    """One config per output dtype: the merge's BLOCK_D does not depend on d."""
    configs = []
    for dtype in TRITON_DTYPE.values():
        pointers = {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": f"*{dtype}"}
        label = f"{dtype} BLOCK_D={_MERGE_BLOCK_D} w{_MERGE_WARPS}"
        constexprs = {"BLOCK_D": _MERGE_BLOCK_D}
        configs.append(_aot_config(_decode_attention_merge_kernel, label, pointers, constexprs, _MERGE_WARPS, 1))
    return configs


_RANGES_AND_STATS = {"KV_START": "*i32", "KV_END": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}
register_aot(
    _span_attention_fwd_kernel,
    _attention_aot_configs(_span_attention_fwd_kernel, _FWD_LAUNCH, ("Q", "K", "V", "O"), _RANGES_AND_STATS),
)
register_aot(
    _span_attention_bwd_dq_kernel,
    _attention_aot_configs(
        _span_attention_bwd_dq_kernel, _DQ_LAUNCH, ("Q", "K", "V", "O", "DO", "DQ"), _RANGES_AND_STATS
    ),
)  # fmt: skip
register_aot(
    _span_attention_bwd_dkdv_kernel,
    _attention_aot_configs(
        _span_attention_bwd_dkdv_kernel, _DKDV_LAUNCH, ("Q", "K", "V", "DO", "DK", "DV"), _RANGES_AND_STATS,
        {"SCAN": _RANGE_SCAN},
    ),
)  # fmt: skip
register_aot(
    _decode_attention_split_kernel,
    _attention_aot_configs(
        _decode_attention_split_kernel, _DECODE_LAUNCH, ("Q", "K_CACHE", "V_CACHE"),
        {"CACHE_LEN": "*i32", "O_PART": "*fp32", "LSE_PART": "*fp32"},
    ),
)  # fmt: skip
register_aot(_decode_attention_merge_kernel, _merge_aot_configs())
