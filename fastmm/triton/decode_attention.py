"""Triton kernels of decode attention (fastmm.ops.decode_attention): flash-decoding over a static cache.

Inputs arrive validated and contiguous from fastmm.ops.attention (see fastmm.triton.attention). Layout of the
launch configuration: the cache of each (b, kv head) is cut into a fixed number of splits chosen on
the host from B * Hkv and S only (never from cache_len, which stays on the device), one program per
(split, b * Hkv, block of 16 (query head, query) rows): the query heads of a kv head share the program, so
each K / V tile is read once for the whole GQA group. Each program writes its unnormalized partial output
with the split's max and sum in fp32 (kept apart, not folded into one lse, for the same floor rows); a
second kernel merges the splits and writes o and lse. Splits past cache_len loop zero times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmm.reference import attention as reference
from fastmm.triton._attention_blocks import (
    MAX_HEAD_DIM, _LOG2E, _Launch, _Masking, _aot_config, _attend_key_tiles, _attention_aot_configs, _block_d,
    _tiles, _too_wide,
)
from fastmm.triton._shared import TRITON_DTYPE, cast, num_sms
from fastmm.triton.aot import AotConfig, register_aot

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
# Ahead-of-time registration: every launch configuration the launcher above can choose
# ----------------------------------------------------------------------------------------------------

def _merge_aot_configs() -> list[AotConfig]:
    """One config per output dtype: the merge's BLOCK_D does not depend on d."""
    configs = []
    for dtype in TRITON_DTYPE.values():
        pointers = {"O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "O": f"*{dtype}", "LSE": "*fp32"}
        label = f"{dtype} BLOCK_D={_MERGE_BLOCK_D} w{_MERGE_WARPS}"
        constexprs = {"BLOCK_D": _MERGE_BLOCK_D}
        configs.append(_aot_config(_decode_attention_merge_kernel, label, pointers, constexprs, _MERGE_WARPS, 1))
    return configs


register_aot(
    _decode_attention_split_kernel,
    _attention_aot_configs(
        _decode_attention_split_kernel, _DECODE_LAUNCH, _DECODE_LAUNCH_MASKED, ("Q", "K_CACHE", "V_CACHE"),
        {"CACHE_LEN": "*i32", "O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32"}, key_keep=False,
    ),
)  # fmt: skip
register_aot(_decode_attention_merge_kernel, _merge_aot_configs())
