"""Triton kernels of the `vq` family: nearest-code search without the N x K score matrix.

index[r] = argmin_k (codebook_sq[k] - 2 z_r.codebook[k]) for every row r of z, in fp32, the lowest k on ties,
a NaN score never winning (an all-NaN row gets 0). Semantics: ``fastmm.reference.vq.nearest_code``.

Inputs arrive validated from ``fastmm.ops.vq``: z [B, S, D] with any strides (rows of an [N, D] matrix as
[1, N, D], or a contiguous channels-first map [B, D, H, W] as the view z.flatten(2).transpose(1, 2), read in
place), codebook [K, D] contiguous in z's dtype, codebook_sq [K] fp32, all on one device. Nothing here syncs
the host, so the launcher can be captured in a CUDA graph.

Layout of the launch configurations:
- Row r = b * S + s of z, addressed through z's strides. One program per (tile of BLOCK_N rows, split); a
  split is a contiguous run of codebook tiles of BLOCK_K codes. Per tile the program computes the
  [BLOCK_N, BLOCK_K] scores and keeps a running best score and best tile per (row, code slot) by compare and
  select, with no reduction inside the loop; one reduction at the end picks, per row, the lowest code among
  the slots holding the row's minimum. Codes past K score +inf (their codebook_sq loads as +inf), and a NaN
  score never compares smaller, so neither ever wins.
- D <= 8 (Emu3 4, Janus / LlamaGen 8): broadcast FMAs on CUDA cores. 16 rows per program with their -2 z in
  registers, one code per thread, BLOCK_D = max(next_power_of_2(D), 4) FMAs per score. At such D the
  argmin, not the dot product, is the work: a score costs BLOCK_D FMAs, a compare and two selects.
- D > 8: tl.dot tiles of 64 rows x 64 codes, over 64-byte chunks of D (fp16 / bf16: 32 dimensions on tensor
  cores; fp32: 16, with tf32x3, see _shared.dot). D from 9 to 15 pads its one chunk with zeros.
- Splits: the rows of one image (ILLUME: 81, Chameleon: 1024) make too few programs to fill the GPU, so the
  codebook is split until about two programs per SM run. Each split writes its rows' (best score, index)
  into a [splits, N] buffer and a second kernel merges them in split order (lowest index on ties); with
  one split the search kernel writes the indices itself. The split count depends on shapes and the SM
  count only.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
import triton
import triton.language as tl

from fastmm.triton._shared import TRITON_DTYPE, aot_signature, dot, split_reduction
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["nearest_code"]

# ----------------------------------------------------------------------------------------------------
# Shared pieces of the two search kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, S, stride_z_b, stride_z_s):
    """Element offsets of rows r = b * S + s of z [B, S, D] (int64: maps can exceed 2^31 elements)."""
    return (rows // S).to(tl.int64) * stride_z_b + (rows % S).to(tl.int64) * stride_z_s


@triton.jit
def _keep_better(scores, tile, best_score, best_tile):
    """Running best per (row, code slot): replace only on a strictly smaller score, so the earlier tile
    keeps ties and a NaN score (never smaller) never wins."""
    better = scores < best_score
    return tl.where(better, scores, best_score), tl.where(better, tile, best_tile)


@triton.jit
def _store_best(BEST_SCORE, BEST_INDEX, split, rows, row_mask, N, best_score, best_tile, BLOCK_K: tl.constexpr):
    """Per row, the lowest code among the slots that hold the row's minimum, written at [split, row].

    A row whose slots all stayed +inf (NaN or infinite scores only) keeps best_tile 0 and gets code 0."""
    row_best = tl.min(best_score, axis=1)
    slot_codes = best_tile * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    above_every_code = 2147483647
    row_index = tl.min(tl.where(best_score == row_best[:, None], slot_codes, above_every_code), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(BEST_SCORE + out, row_best, mask=row_mask)
    tl.store(BEST_INDEX + out, row_index.to(tl.int64), mask=row_mask)


# ----------------------------------------------------------------------------------------------------
# D > 8: tl.dot tiles
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _nearest_code_dot_kernel(
    Z,  # [B, S, D] rows to quantize, any strides
    C,  # [K, D] codebook, contiguous, Z's dtype
    SQ,  # [K] fp32 codebook_sq
    BEST_SCORE,  # [splits, N] fp32 out: each split's best score per row
    BEST_INDEX,  # [splits, N] int64 out: each split's best code per row (the indices when splits == 1)
    N,  # B * S rows
    S,
    K,
    D,
    stride_z_b,
    stride_z_s,
    stride_z_d,
    tiles_per_split,  # code tiles of each split (the last split may hold fewer)
    BLOCK_N: tl.constexpr,  # rows per program, set by the launcher
    BLOCK_K: tl.constexpr,  # codes per tile, set by the launcher
    BLOCK_D: tl.constexpr,  # dimensions per dot step, set by the launcher; D is looped over in such chunks
):
    # One loop over (code tile, D chunk) steps rather than two nested loops, so that the pipeliner prefetches
    # across code tiles too (an inner loop of one chunk, ILLUME's D = 32, would not overlap). The z chunk is
    # re-read every step, a cache hit: a program's rows are 64 x D elements. Tile and chunk come from the
    # step number: counters advanced inside the `if` below would keep the pipeliner from prefetching.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z_rows = Z + _row_offsets(rows, S, stride_z_b, stride_z_s)
    chunk = tl.arange(0, BLOCK_D)
    d_chunks = tl.cdiv(D, BLOCK_D)
    first_tile = split * tiles_per_split
    steps = (tl.minimum(first_tile + tiles_per_split, tl.cdiv(K, BLOCK_K)) - first_tile) * d_chunks

    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    best_score = tl.full((BLOCK_N, BLOCK_K), float("inf"), dtype=tl.float32)
    best_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for step in range(steps):
        tile = first_tile + step // d_chunks
        dims = (step % d_chunks) * BLOCK_D + chunk
        dim_mask = dims < D
        codes = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        z = tl.load(
            z_rows[:, None] + dims[None, :] * stride_z_d, mask=row_mask[:, None] & dim_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        c = tl.load(
            C + codes[:, None].to(tl.int64) * D + dims[None, :], mask=code_mask[:, None] & dim_mask[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_D]
        dots = dot(z, tl.trans(c), dots)
        if step % d_chunks == d_chunks - 1:  # the tile's scores are complete
            sq = tl.load(SQ + codes, mask=code_mask, other=float("inf"))  # codes past K: +inf never wins
            best_score, best_tile = _keep_better(sq[None, :] - 2.0 * dots, tile, best_score, best_tile)
            dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    _store_best(BEST_SCORE, BEST_INDEX, split, rows, row_mask, N, best_score, best_tile, BLOCK_K)


# ----------------------------------------------------------------------------------------------------
# D <= 8: broadcast FMAs
# ----------------------------------------------------------------------------------------------------


# z is read once per program (Triton hoists its loads out of the code loop), so specializing its strides on
# the value 1 would buy nothing: one compiled variant serves rows and channels-first maps alike.
@triton.jit(do_not_specialize=["stride_z_b", "stride_z_s", "stride_z_d"])
def _nearest_code_fma_kernel(
    Z,  # [B, S, D] rows to quantize, any strides
    C,  # [K, D] codebook, contiguous, Z's dtype
    SQ,  # [K] fp32 codebook_sq
    BEST_SCORE,  # [splits, N] fp32 out: each split's best score per row
    BEST_INDEX,  # [splits, N] int64 out: each split's best code per row (the indices when splits == 1)
    N,  # B * S rows
    S,
    K,
    D,
    stride_z_b,
    stride_z_s,
    stride_z_d,
    tiles_per_split,  # code tiles of each split (the last split may hold fewer)
    BLOCK_N: tl.constexpr,  # rows per program, set by the launcher
    BLOCK_K: tl.constexpr,  # codes per tile, set by the launcher
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(D), 4): the FMAs per score, the tail masked
):
    # Triton's default layout spreads the code axis over the threads: with BLOCK_K = 32 * num_warps each
    # thread owns one code of the tile and all BLOCK_N rows. A score costs BLOCK_D FMAs, a compare and two
    # selects, and each code value loaded serves BLOCK_N FMAs.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z_rows = Z + _row_offsets(rows, S, stride_z_b, stride_z_s)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(K, BLOCK_K))

    best_score = tl.full((BLOCK_N, BLOCK_K), float("inf"), dtype=tl.float32)
    best_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for tile in range(first_tile, last_tile):
        codes = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        code_rows = C + codes.to(tl.int64) * D
        # Codes past K: codebook_sq +inf, so the score is +inf (or NaN) and never wins.
        sq = tl.load(SQ + codes, mask=code_mask, other=float("inf"))
        scores = tl.broadcast_to(sq[None, :], (BLOCK_N, BLOCK_K))
        for d in tl.static_range(BLOCK_D):
            # Masks as selects: the interpreter turns `vector & (d < D)` into int32, which tl.load rejects.
            z_mask = tl.where(d < D, row_mask, False)
            c_mask = tl.where(d < D, code_mask, False)
            # -2 z[d] is exact, so the score is codebook_sq + sum_d (-2 z[d]) c[d]: one FMA per dimension.
            z_d = -2.0 * tl.load(z_rows + d * stride_z_d, mask=z_mask, other=0.0).to(tl.float32)
            c_d = tl.load(code_rows + d, mask=c_mask, other=0.0).to(tl.float32)
            scores = tl.fma(z_d[:, None], c_d[None, :], scores)
        best_score, best_tile = _keep_better(scores, tile, best_score, best_tile)
    _store_best(BEST_SCORE, BEST_INDEX, split, rows, row_mask, N, best_score, best_tile, BLOCK_K)


# ----------------------------------------------------------------------------------------------------
# Merge of the splits
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _merge_splits_kernel(
    BEST_SCORE,  # [splits, N] fp32 each split's best score per row
    BEST_INDEX,  # [splits, N] int64 each split's best code per row
    INDEX,  # [N] int64 out
    N,
    splits,
    BLOCK: tl.constexpr,  # rows per program (fixed)
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    best = tl.load(BEST_SCORE + rows, mask=mask)
    index = tl.load(BEST_INDEX + rows, mask=mask)
    for split in range(1, splits):
        score = tl.load(BEST_SCORE + split * N + rows, mask=mask)
        better = score < best  # splits hold increasing codes: a later split wins only when strictly better
        best = tl.where(better, score, best)
        index = tl.where(better, tl.load(BEST_INDEX + split * N + rows, mask=mask), index)
    tl.store(INDEX + rows, index, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One search kernel with its tile sizes, warps and pipeline stages."""

    kernel: Any  # triton.runtime.JITFunction
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


# D <= 8 (Emu3 4, Janus / LlamaGen 8): FMAs. 16 rows per program (their -2 z in registers: 16 x BLOCK_D) and
# one code per thread; narrower rows pad to BLOCK_D = 4 (one compiled variant, not three). Nothing to
# pipeline: the loads go straight to registers.
_FMA_MAX_D = 8
_FMA_LAUNCHES = {block_d: _Launch(_nearest_code_fma_kernel, 16, 128, block_d, 4, 1) for block_d in (4, 8)}
# D > 8, by element size: tl.dot over 64-byte chunks of each row (fp16 / bf16: 32 dimensions, so ILLUME's
# D = 32 takes one step and Chameleon's 256 eight; fp32: 16, as tf32x3 holds two halves of each operand and
# 32-wide fp32 chunks reach 255 registers on sm_80).
_DOT_LAUNCHES = {
    2: _Launch(_nearest_code_dot_kernel, 64, 64, 32, 4, 3),
    4: _Launch(_nearest_code_dot_kernel, 64, 64, 16, 4, 3),
}

_MERGE_BLOCK = 256
_MERGE_WARPS = 4
_PROGRAMS_PER_SM = 2
_MIN_TILES_PER_SPLIT = 4  # a split's fixed costs (pipeline fill, final reduction, partial write) stay small


def _launch(D: int, dtype: torch.dtype) -> _Launch:
    """The search kernel and launch configuration for rows of D elements of ``dtype``."""
    if D <= _FMA_MAX_D:
        return _FMA_LAUNCHES[max(triton.next_power_of_2(D), 4)]
    return _DOT_LAUNCHES[dtype.itemsize]


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor) -> torch.Tensor:
    """argmin_k (codebook_sq[k] - 2 z[b, s].codebook[k]) for every row of z.

    z [B, S, D] fp32 / fp16 / bf16, any strides (a channels-first map [B, D, H, W] arrives as the view
    z.flatten(2).transpose(1, 2) and is read in place); codebook [K, D] contiguous in z's dtype, K >= 1;
    codebook_sq [K] fp32. Returns indices [B, S] int64: fp32 scores, lowest index on ties, a NaN score
    never wins (an all-NaN row gets 0).
    """
    B, S, D = z.shape
    N, K = B * S, codebook.shape[0]
    indices = torch.empty(B, S, dtype=torch.int64, device=z.device)
    if N == 0:
        return indices
    launch = _launch(D, z.dtype)
    row_tiles = triton.cdiv(N, launch.block_n)
    splits, tiles_per_split = split_reduction(
        row_tiles, triton.cdiv(K, launch.block_k), z.device, _PROGRAMS_PER_SM, _MIN_TILES_PER_SPLIT
    )
    best_score = torch.empty(splits, N, dtype=torch.float32, device=z.device)
    best_index = indices.view(1, N) if splits == 1 else torch.empty(splits, N, dtype=torch.int64, device=z.device)
    launch.kernel[(row_tiles, splits)](
        z, codebook, codebook_sq, best_score, best_index, N, S, K, D, *z.stride(), tiles_per_split,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, BLOCK_D=launch.block_d,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(triton.cdiv(N, _MERGE_BLOCK),)](
            best_score, best_index, indices, N, splits, BLOCK=_MERGE_BLOCK, num_warps=_MERGE_WARPS, num_stages=1
        )
    return indices


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launcher above can choose
# ----------------------------------------------------------------------------------------------------

# The dot kernel re-reads z every step, so the JIT's specialization of a unit stride matters and each
# layout compiles its own variant: rows ([1, N, D]: unit stride along D; every stride a multiple of 16 at
# real D) and channels-first maps (unit stride along S; H * W need not be a multiple of 16: ILLUME's 9 x 9).
# K is a multiple of 16 in every real codebook (8192 to 98304), and so is D on the dot path (32, 256).
_DOT_LAYOUTS = {
    "rows": ({"stride_z_d": 1}, ("K", "D", "stride_z_b", "stride_z_s")),
    "channels-first": ({"stride_z_s": 1}, ("K", "D", "stride_z_b")),
}


def _search_aot_config(dtype: str, launch: _Launch, layout: str, unit_strides: dict, divisible: tuple) -> AotConfig:
    """A search kernel's launch with z and the codebook in ``dtype``, the strides in ``unit_strides``
    constexpr 1 and the integer arguments in ``divisible`` multiples of 16, as the JIT specializes them."""
    kernel = launch.kernel
    constexprs = {"BLOCK_N": launch.block_n, "BLOCK_K": launch.block_k, "BLOCK_D": launch.block_d, **unit_strides}
    pointers = {"Z": f"*{dtype}", "C": f"*{dtype}", "SQ": "*fp32", "BEST_SCORE": "*fp32", "BEST_INDEX": "*i64"}
    tile = f"{launch.block_n}x{launch.block_k}x{launch.block_d}"
    label = f"{dtype} {layout} {tile} w{launch.num_warps} s{launch.num_stages}"
    signature = aot_signature(kernel, pointers, constexprs)
    return AotConfig(label, signature, constexprs, launch.num_warps, launch.num_stages, divisible)


register_aot(
    _nearest_code_dot_kernel,
    [
        _search_aot_config(dtype, _DOT_LAUNCHES[torch_dtype.itemsize], layout, unit_strides, divisible)
        for (torch_dtype, dtype), (layout, (unit_strides, divisible)) in itertools.product(
            TRITON_DTYPE.items(), _DOT_LAYOUTS.items()
        )
    ],
)
register_aot(
    _nearest_code_fma_kernel,
    [
        _search_aot_config(dtype, launch, "any layout", {}, ("K",))
        for dtype, launch in itertools.product(TRITON_DTYPE.values(), _FMA_LAUNCHES.values())
    ],
)
_MERGE_CONSTEXPRS = {"BLOCK": _MERGE_BLOCK}
register_aot(
    _merge_splits_kernel,
    [
        AotConfig(
            f"BLOCK={_MERGE_BLOCK}",
            aot_signature(
                _merge_splits_kernel, {"BEST_SCORE": "*fp32", "BEST_INDEX": "*i64", "INDEX": "*i64"}, _MERGE_CONSTEXPRS
            ),
            _MERGE_CONSTEXPRS,
            num_warps=_MERGE_WARPS,
            num_stages=1,
        )
    ],
)
