"""Triton kernels of the `attention` family: span attention (prefill) and flash-decoding over a static cache.

Every mask is one key range per query, ``kv_start[b, i] <= j < kv_end[b, i]`` (causal text, bidirectional
image spans, packed documents, sliding windows), so a kernel reads O(L) metadata instead of an L x L mask.
On top of the ranges a launch may take key padding (key_keep [B, S] bool), any [B, Lq, S] mask (bool: False
drops the pair; float32: added to the logits) and a logit softcap; each is a constexpr flag, so a launch
without them compiles to the plain range kernel. Semantics: ``fastmm.reference.attention`` (its
kernel-interface section).

Inputs arrive validated and contiguous from ``fastmm.ops.attention``: q [B, Hq, Lq, d], k / v [B, Hkv, S, d]
with Lq <= S and Hq a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)), fp32 / fp16 / bf16, int32
key ranges [B, Lq] indexing the S keys and cache lengths on the device. Nothing here syncs the host: every
launch is CUDA-graph capturable.

Layout of the launch configurations:
- span attention forward (flash-attention 2): one program per (query tile of BLOCK_M, b * Hq + h). The
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
- span attention backward (flash-attention 2, no atomics), two launches. dq: one program per (query tile,
  b * Hq + h) over the same three runs of key tiles as the forward, also writing delta = rowsum(do * o) - dlse
  for its rows (dlse: the gradient reaching lse). Then dk / dv: one program per (key tile, b * Hkv + kv head)
  that scans its row's key ranges for the run of queries attending its keys and loops over those query tiles
  for every query head of its GQA group, summing dk and dv over the group in registers; a per-tile flag skips
  the range mask on query tiles whose every range holds the whole key tile.
  Both recompute p = exp2(logit - lse) from the forward's lse, except under a float mask: a row whose logits
  all sit near the mask floor (-1e30) has an lse that lost log(count) to rounding (and even moderate masks
  such as -1e4 lose digits in lse's round trip through natural-log units), so there the dq kernel first
  recomputes each row's max and sum exactly as the forward did, uses them, and writes them for dk / dv.
- decode (flash-decoding): the cache of each (b, kv head) is cut into a fixed number of splits chosen on
  the host from B * Hkv and S only (never from cache_len, which stays on the device), one program per
  (split, b * Hkv, block of 16 (query head, query) rows): the query heads of a kv head share the program, so
  each K / V tile is read once for the whole GQA group. Each program writes its unnormalized partial output
  with the split's max and sum in fp32 (kept apart, not folded into one lse, for the same floor rows); a
  second kernel merges the splits and writes o and lse. Splits past cache_len loop zero times.

Head dims are padded to BLOCK_D = 64 or 128 with masking (every d in [1, 128] runs one of two compiled
variants); wider heads have no compiled configuration and run ``fastmm.reference.attention`` instead,
with one logged warning per op. Launches with key padding, a mask or a softcap run smaller tiles (see
_FWD_LAUNCH_MASKED); the fp32 backward among them has none that compiles spill-free at BLOCK_D = 128 and
runs the reference there, with one logged warning.
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

# MASK_KIND, the constexpr saying what the optional [B, Lq, S] mask is: none, bool (read as uint8) or float32.
_MASK_NONE = tl.constexpr(0)
_MASK_BOOL = tl.constexpr(1)
_MASK_FLOAT = tl.constexpr(2)


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

# Decode tiles: 16 (query head, query) rows, the smallest tensor-core tile, cover a GQA group of up to 16
# query heads at Lq = 1 (larger groups take several row blocks, each reading the kv head again). Decode is
# bound by reading the cache: 64-key tiles for 16-bit caches, 32 for fp32 (the same 8 KiB per row block
# at BLOCK_D = 64), three stages in flight (two for fp32 at BLOCK_D = 64, where three spill on sm_90).
# With a mask or a softcap, fp32 takes 16-key tiles (32 spill); 16-bit caches keep theirs.
_DECODE_ROWS = 16
_DECODE_LAUNCH = {
    (2, 64): _Launch(block_m=_DECODE_ROWS, block_n=64, num_warps=4, num_stages=3),
    (2, 128): _Launch(block_m=_DECODE_ROWS, block_n=64, num_warps=4, num_stages=3),
    (4, 64): _Launch(block_m=_DECODE_ROWS, block_n=32, num_warps=4, num_stages=2),
    (4, 128): _Launch(block_m=_DECODE_ROWS, block_n=32, num_warps=4, num_stages=3),
}
_DECODE_LAUNCH_MASKED = {
    (2, 64): _DECODE_LAUNCH[2, 64],
    (2, 128): _DECODE_LAUNCH[2, 128],
    (4, 64): _Launch(block_m=_DECODE_ROWS, block_n=16, num_warps=4, num_stages=3),
    (4, 128): _Launch(block_m=_DECODE_ROWS, block_n=16, num_warps=4, num_stages=3),
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


@dataclasses.dataclass(frozen=True)
class _Masking:
    """The optional masking arguments as a launch passes them: pointers (an absent one is q, never read), their
    strides and the constexprs that select the code reading them. Bool tensors are read as uint8.

    A kernel takes key padding or a mask, never both: given both, the padding is folded into the mask (one
    [B, Lq, S] pass), so that every launch is one of the variants compiled ahead of time (_MASKING_VARIANTS).
    fastmm's integrations never pass both."""

    key_keep: torch.Tensor  # [B, S] uint8
    mask: torch.Tensor  # [B, Lq, S] uint8 or fp32
    stride_keep_b: int
    stride_mask_b: int
    stride_mask_q: int
    cap_in: float  # scale / softcap: the tanh's argument is q.k * cap_in
    cap_out: float  # softcap * log2(e): logits in log2 units are tanh * cap_out
    constexprs: dict  # HAS_KEY_KEEP, MASK_KIND, SOFTCAP

    @staticmethod
    def of(q: torch.Tensor, key_keep: torch.Tensor | None, mask: torch.Tensor | None, scale: float,
           softcap: float) -> "_Masking":  # fmt: skip
        if key_keep is not None and mask is not None:
            kept = key_keep[:, None, :]
            mask = mask & kept if mask.dtype == torch.bool else mask.masked_fill(~kept, float("-inf"))
            key_keep = None
        keep = q if key_keep is None else key_keep.view(torch.uint8)
        if mask is None:
            mask_kind, mask_arg = _MASK_NONE.value, q
        elif mask.dtype == torch.bool:
            mask_kind, mask_arg = _MASK_BOOL.value, mask.view(torch.uint8)
        else:
            mask_kind, mask_arg = _MASK_FLOAT.value, mask
        return _Masking(
            keep, mask_arg, keep.stride(0) if key_keep is not None else 0,
            *(mask_arg.stride()[:2] if mask is not None else (0, 0)),
            scale / softcap if softcap else 0.0, softcap * _LOG2E,
            {"HAS_KEY_KEEP": key_keep is not None, "MASK_KIND": mask_kind, "SOFTCAP": bool(softcap)},
        )  # fmt: skip


def _tiles(plain: dict, masked: dict, itemsize: int, block_d: int, masking: dict) -> _Launch | None:
    """The tiles of a launch with the ``masking`` constexprs: from ``masked`` when any is set (key_keep, a mask or
    a softcap is read), else from ``plain``; None where ``masked`` has no spill-free tiles for the bucket."""
    return (masked if any(masking.values()) else plain).get((itemsize, block_d))


# ----------------------------------------------------------------------------------------------------
# Logits and the online-softmax loop of the forward and decode kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _key_mask(keys, key_end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys of the tile that may be read: in a masked run the last tile can pass the keys (and the tensor)."""
    if MASKED:
        return keys < key_end
    return tl.full((BLOCK_N,), 1, tl.int1)


@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter cannot run libdevice's), through e = exp(-2|x|) in (0, 1]: no overflow."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # -2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cap(qk, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """(logits in log2 units, tanh) from fp32 q.k: q.k * scale, or with SOFTCAP softcap * tanh(q.k * scale /
    softcap). The backward's chain rule needs the tanh (d logit / d (q.k * scale) = 1 - tanh^2); without
    SOFTCAP the second value is q.k and goes unused."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        return t * cap_out, t
    return qk * qk_scale, qk


@triton.jit
def _apply_masks(scores, keep_ptrs, mask_ptrs, key_valid, pair_valid, HAS_KEY_KEEP: tl.constexpr,
                 MASK_KIND: tl.constexpr):  # fmt: skip
    """key_keep and the mask on a tile of logits in log2 units: -inf where key_keep or a bool mask drops the key,
    plus a float mask (natural units, hence the log2(e)). The pointers and validity masks broadcast to the tile,
    queries x keys or keys x queries alike."""
    if HAS_KEY_KEEP:
        scores = tl.where(tl.load(keep_ptrs, mask=key_valid, other=0) != 0, scores, float("-inf"))
    if MASK_KIND == _MASK_BOOL:
        scores = tl.where(tl.load(mask_ptrs, mask=pair_valid, other=0) != 0, scores, float("-inf"))
    if MASK_KIND == _MASK_FLOAT:
        scores += tl.load(mask_ptrs, mask=pair_valid, other=0.0) * 1.4426950408889634  # log2(e)
    return scores


@triton.jit
def _logits(
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype
    k_t,  # [BLOCK_D, BLOCK_N] keys, transposed
    keys,  # [BLOCK_N] key indices
    key_valid,  # [BLOCK_N] keys that exist
    q_start,  # [BLOCK_M] int32 first key of each query's range
    q_end,  # [BLOCK_M] int32 end (exclusive) of each query's range
    row_mask,  # [BLOCK_M] queries that exist
    keep_row,  # pointer to key_keep[b, 0] (read when HAS_KEY_KEEP)
    mask_rows,  # [BLOCK_M, 1] pointers to mask[b, query, 0] (read when MASK_KIND is not none)
    qk_scale,
    cap_in,
    cap_out,
    BLOCK_M: tl.constexpr,
    IN_RANGE: tl.constexpr,  # mask each query's range (a partial tile)
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """([BLOCK_M, BLOCK_N] fp32 logits in log2 units, -inf where the query may not attend the key; the tanh
    of _cap)."""
    qk = dot(q, k_t, tl.zeros((BLOCK_M, k_t.shape[1]), dtype=tl.float32))
    scores, t = _cap(qk, qk_scale, cap_in, cap_out, SOFTCAP)
    if IN_RANGE:
        in_range = (keys[None, :] >= q_start[:, None]) & (keys[None, :] < q_end[:, None])
        scores = tl.where(in_range, scores, float("-inf"))
    scores = _apply_masks(
        scores, keep_row + keys[None, :], mask_rows + keys[None, :], key_valid[None, :],
        row_mask[:, None] & key_valid[None, :], HAS_KEY_KEEP, MASK_KIND,
    )  # fmt: skip
    return scores, t


@triton.jit
def _softmax_step(scores, m_i, l_i, GUARD: tl.constexpr):
    """One tile of the online softmax in log2 units: (p = exp2(scores - m_new), alpha = exp2(m_i - m_new), m_new,
    l_new). GUARD: some row of the tile may hold only -inf logits; a row still at m = -inf then shifts by 0, so
    its p and alpha are 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_shift = m_new
    if GUARD:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_key_tiles(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p @ v (unnormalized)
    m_i,  # [BLOCK_M] fp32 running max of the logits, log2 units (-inf while a row has seen no key)
    l_i,  # [BLOCK_M] fp32 running sum of exp2(logit - m_i)
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
    row_mask,  # [BLOCK_M] queries that exist
    keep_row,  # pointer to key_keep[b, 0]
    mask_rows,  # [BLOCK_M, 1] pointers to mask[b, query, 0]
    d_mask,  # [BLOCK_D] head dims that exist
    qk_scale,  # softmax scale * log2(e)
    cap_in,  # scale / softcap
    cap_out,  # softcap * log2(e)
    BLOCK_M: tl.constexpr,  # query rows
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # padded head dim
    MASKED: tl.constexpr,  # some tile of [tile_lo, tile_hi) is not inside every query's range
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        keys = start_n + offs_n
        key_mask = _key_mask(keys, key_end, BLOCK_N, MASKED)
        k_t = tl.load(
            K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=d_mask[:, None] & key_mask[None, :], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        scores, _ = _logits(
            q, k_t, keys, key_mask, q_start, q_end, row_mask, keep_row, mask_rows, qk_scale, cap_in, cap_out,
            BLOCK_M, MASKED, HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
        )  # fmt: skip
        p, alpha, m_i, l_i = _softmax_step(scores, m_i, l_i, MASKED or (HAS_KEY_KEEP or MASK_KIND != _MASK_NONE))
        v = tl.load(
            V + keys[:, None] * stride_v_key + offs_d[None, :], mask=key_mask[:, None] & d_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None])
    return acc, m_i, l_i


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
# Decode attention: split kernel and merge
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _decode_attention_split_kernel(
    Q,  # [B, Hq, Lq, d]
    K_CACHE,  # [B, Hkv, S, d]
    V_CACHE,  # [B, Hkv, S, d]
    CACHE_LEN,  # [B] int32 valid keys per row; query i attends keys j < CACHE_LEN[b] - Lq + i + 1
    MASK,  # [B, Lq, S] uint8 (0 drops the pair) or fp32 (added to the logits), per MASK_KIND
    O_PART,  # [B, Hq, Lq, num_splits, d] fp32 out: each split's unnormalized output sum(p v)
    M_PART,  # [B, Hq, Lq, num_splits] fp32 out: each split's max logit, log2 units (-inf: no key)
    L_PART,  # [B, Hq, Lq, num_splits] fp32 out: each split's sum of exp2(logit - max) (0: no key)
    stride_q_b,
    stride_q_h,
    stride_q_l,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_mask_b,
    stride_mask_q,
    stride_op_b,
    stride_op_h,
    stride_op_l,
    stride_op_split,
    stride_mp_b,  # M_PART and L_PART share one layout
    stride_mp_h,
    stride_mp_l,
    num_kv_heads,  # Hkv
    group,  # Hq // Hkv: query heads per kv head
    num_queries,  # Lq
    cache_size,  # S
    head_dim,  # d (the last dimension of every [.., d] tensor has unit stride)
    split_size,  # keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    cap_in,  # scale / softcap (read when SOFTCAP)
    cap_out,  # softcap * log2(e) (read when SOFTCAP)
    BLOCK_M: tl.constexpr,  # (query head, query) rows per program: 16
    BLOCK_N: tl.constexpr,  # keys per tile, from _DECODE_LAUNCH
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(d), 64)
    MASK_KIND: tl.constexpr,  # _MASK_NONE, _MASK_BOOL or _MASK_FLOAT
    SOFTCAP: tl.constexpr,  # softcap > 0
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
    # Whole tiles below every real row's end need no range mask: [split_lo, full_hi) unmasked, then [full_hi, split_hi).
    unmasked_end = tl.min(tl.where(row_mask, q_end, cache_len), axis=0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(unmasked_end, split_hi), split_lo)

    q = tl.load(
        Q + b * stride_q_b + heads[:, None] * stride_q_h + queries[:, None] * stride_q_l + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    k_head = K_CACHE + b * stride_k_b + kv_head * stride_k_h
    v_head = V_CACHE + b * stride_v_b + kv_head * stride_v_h
    mask_rows = MASK + b * stride_mask_b + queries[:, None] * stride_mask_q
    q_start = tl.zeros((BLOCK_M,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, split_lo, full_hi, split_hi, q_start, q_end,
        row_mask, MASK, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, False, False,
        MASK_KIND, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, k_head, v_head, stride_k_s, stride_v_s, full_hi, split_hi, split_hi, q_start, q_end,
        row_mask, MASK, mask_rows, d_mask, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, BLOCK_D, True, False,
        MASK_KIND, SOFTCAP,
    )  # fmt: skip

    o_ptrs = (
        O_PART + b * stride_op_b + heads[:, None] * stride_op_h + queries[:, None] * stride_op_l
        + split * stride_op_split + offs_d[None, :]
    )  # fmt: skip
    tl.store(o_ptrs, acc, mask=row_mask[:, None] & d_mask[None, :])
    stat_ptrs = b * stride_mp_b + heads * stride_mp_h + queries * stride_mp_l + split
    tl.store(M_PART + stat_ptrs, m_i, mask=row_mask)
    tl.store(L_PART + stat_ptrs, l_i, mask=row_mask)


@triton.jit
def _decode_attention_merge_kernel(
    O_PART,  # [rows, num_splits, d] fp32: the split kernel's unnormalized outputs, rows = B * Hq * Lq
    M_PART,  # [rows, num_splits] fp32 max logit per split, log2 units
    L_PART,  # [rows, num_splits] fp32 sum of exp2(logit - max) per split
    O,  # [rows, d] output, Q's dtype
    LSE,  # [rows] fp32 out: log-sum-exp of the row's logits (-inf: no key attended)
    stride_op_row,
    stride_op_split,
    stride_mp_row,  # M_PART and L_PART share one layout
    stride_o_row,
    num_splits,
    head_dim,
    BLOCK_D: tl.constexpr,  # _MERGE_BLOCK_D (128) for every d
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_max = tl.load(M_PART + row * stride_mp_row)
    for split in range(1, num_splits):
        m_max = tl.maximum(m_max, tl.load(M_PART + row * stride_mp_row + split))
    # A mask can leave a query no key at all (every split at -inf): shift by 0 so the weights are 0, not NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    # Maxima and sums stay apart: a row whose logits sit at the mask floor (-1e30) would lose each split's
    # log2(sum) to rounding if they were folded into one log-sum-exp, and weigh the splits equally.
    total = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for split in range(num_splits):
        weight = tl.math.exp2(tl.load(M_PART + row * stride_mp_row + split) - m_max)
        o_split = tl.load(O_PART + row * stride_op_row + split * stride_op_split + offs_d, mask=d_mask, other=0.0)
        acc += weight * o_split
        total += weight * tl.load(L_PART + row * stride_mp_row + split)
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    tl.store(O + row * stride_o_row + offs_d, cast(acc / total, O.dtype.element_ty), mask=d_mask)
    tl.store(LSE + row, tl.where(empty, float("-inf"), (m_max + tl.math.log2(total)) * 0.6931471805599453))  # ln 2


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
    int32 with Lq <= cache_len <= S (read on the device only). Query i attends keys j < cache_len - Lq + i + 1
    that a bool mask [B, Lq, S] allows; a float mask [B, Lq, S] is added to the softcapped logits.

    Returns (o [B, Hq, Lq, d] in q's dtype, lse [B, Hq, Lq] fp32), o = 0 and lse = -inf for a query that
    attends no key.
    """
    B, Hq, Lq, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if _too_wide("decode_attention", d):
        return reference.decode_attention_fwd(q, k_cache, v_cache, cache_len, scale, mask, softcap)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    masking = _Masking.of(q, None, mask, scale, softcap)
    block_d = _block_d(d)
    launch = _tiles(_DECODE_LAUNCH, _DECODE_LAUNCH_MASKED, q.element_size(), block_d, masking.constexprs)
    num_splits, split_size = _decode_splits(B * Hkv, S, launch.block_n, q.device)
    o_part = torch.empty(B, Hq, Lq, num_splits, d, dtype=torch.float32, device=q.device)
    m_part = torch.empty(B, Hq, Lq, num_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    group = Hq // Hkv
    grid = (num_splits, B * Hkv, triton.cdiv(group * Lq, launch.block_m))
    _decode_attention_split_kernel[grid](
        q, k_cache, v_cache, cache_len, masking.mask, o_part, m_part, l_part,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], masking.stride_mask_b, masking.stride_mask_q,
        *o_part.stride()[:4], *m_part.stride()[:3], Hkv, group, Lq, S, d, split_size, scale * _LOG2E,
        masking.cap_in, masking.cap_out,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d, MASK_KIND=masking.constexprs["MASK_KIND"],
        SOFTCAP=masking.constexprs["SOFTCAP"], num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    # o_part, m_part, l_part, o and lse are contiguous, so the (b, h, query) rows flatten with the Lq stride.
    rows = B * Hq * Lq
    _decode_attention_merge_kernel[(rows,)](
        o_part, m_part, l_part, o, lse, o_part.stride(2), o_part.stride(3), m_part.stride(2), o.stride(2),
        num_splits, d, BLOCK_D=_MERGE_BLOCK_D, num_warps=_MERGE_WARPS, num_stages=1,
    )  # fmt: skip
    return o, lse


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

# Integer arguments divisible by 16 at real sizes (d = 64 .. 128): every stride that is a multiple of d, the
# head dim, and the decode split size (a multiple of BLOCK_N). Strides that are multiples of Lq, S or of the
# split count only (key ranges, key_keep, masks, log-sum-exps) are not, and neither are head or query counts.
_ALIGNED = {
    "_span_attention_fwd_kernel": ("stride_q_", "stride_k_", "stride_v_", "stride_o_", "head_dim"),
    "_span_attention_bwd_dq_kernel": ("stride_q_", "stride_k_", "stride_v_", "head_dim"),
    "_span_attention_bwd_dkdv_kernel": ("stride_q_", "stride_k_", "head_dim"),
    "_decode_attention_split_kernel": (
        "stride_q_", "stride_k_", "stride_v_", "stride_op_", "head_dim", "split_size",
    ),
    "_decode_attention_merge_kernel": ("stride_op_", "stride_o_row", "head_dim"),
}  # fmt: skip

# The masking variants compiled ahead of time: every one a launch can produce (_Masking never pairs key_keep
# with a mask). Register allocation is not monotonic in the code (a variant with fewer loads has been seen to
# spill where a larger one did not), so no variant stands in for another.
_MASKING_VARIANTS = tuple(
    (label, {"HAS_KEY_KEEP": keep, "MASK_KIND": kind.value, "SOFTCAP": cap})
    for label, keep, kind, cap in (
        ("", False, _MASK_NONE, False), ("cap", False, _MASK_NONE, True),
        ("keep", True, _MASK_NONE, False), ("keep+cap", True, _MASK_NONE, True),
        ("bool", False, _MASK_BOOL, False), ("bool+cap", False, _MASK_BOOL, True),
        ("float", False, _MASK_FLOAT, False), ("float+cap", False, _MASK_FLOAT, True),
    )
)  # fmt: skip


def _masking_pointers(constexprs: dict, dtype: str) -> dict:
    """KEY_KEEP and MASK as a launch passes them: uint8 / fp32 when given, else q (never read)."""
    mask_kind = constexprs["MASK_KIND"]
    mask = {_MASK_NONE.value: f"*{dtype}", _MASK_BOOL.value: "*u8", _MASK_FLOAT.value: "*fp32"}[mask_kind]
    return {"KEY_KEEP": "*u8" if constexprs.get("HAS_KEY_KEEP") else f"*{dtype}", "MASK": mask}


def _aot_config(kernel, label: str, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    """AotConfig with the float arguments typed fp32 and the integers of _ALIGNED marked divisible by 16."""
    signature = aot_signature(kernel, pointers, constexprs, floats=("qk_scale", "scale", "cap_in", "cap_out"))
    prefixes = _ALIGNED[kernel.fn.__name__]
    aligned = tuple(name for name, kind in signature.items() if kind == "i32" and name.startswith(prefixes))
    return AotConfig(label, signature, constexprs, num_warps, num_stages, aligned)


def _attention_aot_configs(
    kernel, launches: dict, masked_launches: dict, pointer_names: tuple[str, ...], extra: dict,
    fixed: dict | None = None, key_keep: bool = True,
) -> list[AotConfig]:  # fmt: skip
    """One config per (dtype, BLOCK_D, masking variant) with the tiles a launch picks for it (``launches`` without
    masking, ``masked_launches`` with): ``pointer_names`` in the input dtype, ``extra`` pointers as given, ``fixed``
    constexprs beside the tile sizes and masking flags; ``key_keep`` False for a kernel without key padding."""
    configs = []
    for (torch_dtype, dtype), block_d, (suffix, masking) in itertools.product(
        TRITON_DTYPE.items(), _BLOCK_DS, _MASKING_VARIANTS
    ):
        if not key_keep:
            if masking["HAS_KEY_KEEP"]:
                continue
            masking = {name: value for name, value in masking.items() if name != "HAS_KEY_KEEP"}
        launch = _tiles(launches, masked_launches, torch_dtype.itemsize, block_d, masking)
        if launch is None:  # those launches run the reference
            continue
        pointers = {name: f"*{dtype}" for name in pointer_names} | extra | _masking_pointers(masking, dtype)
        constexprs = {
            "BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n, "BLOCK_D": block_d, **(fixed or {}), **masking,
        }  # fmt: skip
        label = f"{dtype} {launch.block_m}x{launch.block_n}x{block_d} w{launch.num_warps} s{launch.num_stages}"
        label += f" {suffix}" if suffix else ""
        configs.append(_aot_config(kernel, label, pointers, constexprs, launch.num_warps, launch.num_stages))
    return configs


def _merge_aot_configs() -> list[AotConfig]:
    """One config per output dtype: the merge's BLOCK_D does not depend on d."""
    configs = []
    for dtype in TRITON_DTYPE.values():
        pointers = {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "O": f"*{dtype}", "LSE": "*fp32"}
        label = f"{dtype} BLOCK_D={_MERGE_BLOCK_D} w{_MERGE_WARPS}"
        constexprs = {"BLOCK_D": _MERGE_BLOCK_D}
        configs.append(_aot_config(_decode_attention_merge_kernel, label, pointers, constexprs, _MERGE_WARPS, 1))
    return configs


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
register_aot(
    _decode_attention_split_kernel,
    _attention_aot_configs(
        _decode_attention_split_kernel, _DECODE_LAUNCH, _DECODE_LAUNCH_MASKED, ("Q", "K_CACHE", "V_CACHE"),
        {"CACHE_LEN": "*i32", "O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32"}, key_keep=False,
    ),
)  # fmt: skip
register_aot(_decode_attention_merge_kernel, _merge_aot_configs())
