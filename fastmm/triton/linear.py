"""Triton kernels of the `linear` family: y = x weight^T + bias for the skinny x of decode steps (M <= 16).

Semantics: ``fastmm.reference.linear``. Inputs arrive validated from ``fastmm.ops.linear``: x [M, K] and
weight [N, K] with any strides, bias [N] or None, one dtype, one device. Larger M (prefill) runs F.linear
(cuBLAS). Nothing here syncs the host, so the launcher can be captured in a CUDA graph.

Layout of the launch configurations:
- A GEMV over all M rows at once: one program per (BLOCK_N output columns, split of K). It loops over its
  K tiles of BLOCK_K, loading the [16, BLOCK_K] tile of x (rows past M masked to zero: 16 is tl.dot's
  smallest M tile) and the [BLOCK_N, BLOCK_K] tile of weight, and accumulates their tl.dot in fp32. Each
  weight element is read once for all M rows; the weight stream, not the math, is the cost.
- Splits of K: N / BLOCK_N programs alone leave most SMs idle for the narrow projections of a decoder
  (N = 512 at hidden 512: 8 programs), so K is split until about _PROGRAMS_PER_SM programs per SM run, no
  split shorter than _MIN_TILES_PER_SPLIT tiles. With one split the kernel adds the bias and stores y;
  otherwise each split stores fp32 partial sums in a [splits, M, N] buffer and a second kernel adds them in
  split order, then the bias (deterministic: no atomics). The split count depends on shapes and the SM
  count only.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast, dot, split_reduction
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["SKINNY_MAX_ROWS", "linear"]

# Rows of x up to which the GEMV kernel runs: every decode step; all of them fit one tl.dot tile.
SKINNY_MAX_ROWS = 16


@triton.jit
def _skinny_linear_kernel(
    X,  # [M, K] input rows, any strides
    W,  # [N, K] weight, any strides
    B,  # [N] bias when HAS_BIAS (else W, never read)
    OUT,  # FINAL: [M, N] y in X's dtype; else [splits, M, N] fp32 partial sums
    M,
    N,
    K,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    tiles_per_split,  # K tiles of each split (the last split may hold fewer)
    HAS_BIAS: tl.constexpr,  # bias given
    FINAL: tl.constexpr,  # one split: add the bias and store y; else store this split's partial sums
    BLOCK_M: tl.constexpr,  # 16 >= M: every row of x in one tl.dot tile
    BLOCK_N: tl.constexpr,  # output columns per program, by element size (see _LAUNCHES)
    BLOCK_K: tl.constexpr,  # reduction step, by element size (see _LAUNCHES)
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x_m
    w_rows = W + cols.to(tl.int64)[:, None] * stride_w_n
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(K, BLOCK_K))

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_x_k, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_w_k, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = dot(x, tl.trans(w), acc)  # [BLOCK_M, BLOCK_N]

    out = rows[:, None] * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + out, cast(acc, OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + split.to(tl.int64) * M * N + out, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(
    PARTIAL,  # [splits, M, N] fp32 partial sums of the splits
    B,  # [N] bias when HAS_BIAS (else Y, never read)
    Y,  # [M, N] out
    M,
    N,
    splits,
    HAS_BIAS: tl.constexpr,  # bias given
    BLOCK: tl.constexpr,  # outputs per program (fixed)
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    partial = PARTIAL + offsets
    for _ in range(splits):  # in split order: the sum does not depend on scheduling
        acc += tl.load(partial, mask=mask, other=0.0)
        partial += M * N
    if HAS_BIAS:
        acc += tl.load(B + offsets % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, cast(acc, Y.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Tile sizes, warps and pipeline stages of the GEMV kernel for one element size."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# By element size: 16 KiB of weights per K tile (64 columns x 128 fp16 / bf16 or x 64 fp32: tf32x3 holds
# two halves of each operand, so fp32 takes the narrower step), four tiles in flight per program.
_LAUNCHES = {2: _Launch(64, 128, 4, 4), 4: _Launch(64, 64, 4, 4)}
_BLOCK_M = SKINNY_MAX_ROWS  # every row of x in one tl.dot tile (16 is also tl.dot's smallest M tile)
_SUM_BLOCK = 1024
_SUM_WARPS = 4
_PROGRAMS_PER_SM = 4  # a GEMV hides memory latency with loads in flight: several programs per SM
_MIN_TILES_PER_SPLIT = 4  # a split's fixed costs (pipeline fill, partial write) stay small


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x weight^T + bias.

    x [M, K] and weight [N, K] fp32 / fp16 / bf16 in one dtype, any strides; bias [N] or None. Returns y
    [M, N] contiguous in that dtype, fp32 accumulation. M <= SKINNY_MAX_ROWS runs the GEMV kernel, larger M
    F.linear.
    """
    (M, K), N = x.shape, weight.shape[0]
    if M > SKINNY_MAX_ROWS:
        return F.linear(x, weight, bias)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    launch = _LAUNCHES[x.element_size()]
    col_tiles = triton.cdiv(N, launch.block_n)
    k_tiles = max(1, triton.cdiv(K, launch.block_k))  # K = 0: one empty tile, so y = bias
    splits, tiles_per_split = split_reduction(col_tiles, k_tiles, x.device, _PROGRAMS_PER_SM, _MIN_TILES_PER_SPLIT)
    bias = None if bias is None else bias.contiguous()
    out = y if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    _skinny_linear_kernel[(col_tiles, splits)](
        x, weight, weight if bias is None else bias, out, M, N, K, *x.stride(), *weight.stride(), tiles_per_split,
        HAS_BIAS=bias is not None, FINAL=splits == 1, BLOCK_M=_BLOCK_M, BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, _SUM_BLOCK),)](
            out, y if bias is None else bias, y, M, N, splits, HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK,
            num_warps=_SUM_WARPS, num_stages=1,
        )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launcher above can choose
# ----------------------------------------------------------------------------------------------------

# Each dtype with a bias (the heavier variant: without one the kernels only skip a load), rows and weight
# with unit stride along K (nn.Linear weights, activations), as the JIT specializes them. N, K and the row
# strides are multiples of 16 at real model sizes.
_GEMV_DIVISIBLE = ("N", "K", "stride_x_m", "stride_w_n")


def _gemv_aot_config(torch_dtype: torch.dtype, final: bool) -> AotConfig:
    dtype = TRITON_DTYPE[torch_dtype]
    launch = _LAUNCHES[torch_dtype.itemsize]
    constexprs = {
        "HAS_BIAS": True, "FINAL": final, "BLOCK_M": _BLOCK_M, "BLOCK_N": launch.block_n,
        "BLOCK_K": launch.block_k, "stride_x_k": 1, "stride_w_k": 1,
    }  # fmt: skip
    pointers = {"X": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "OUT": f"*{dtype}" if final else "*fp32"}
    tile = f"{_BLOCK_M}x{launch.block_n}x{launch.block_k}"
    label = f"{dtype} {'one split' if final else 'split K'} {tile} w{launch.num_warps} s{launch.num_stages}"
    signature = aot_signature(_skinny_linear_kernel, pointers, constexprs)
    return AotConfig(label, signature, constexprs, launch.num_warps, launch.num_stages, _GEMV_DIVISIBLE)


def _sum_aot_config(torch_dtype: torch.dtype) -> AotConfig:
    dtype = TRITON_DTYPE[torch_dtype]
    constexprs = {"HAS_BIAS": True, "BLOCK": _SUM_BLOCK}
    pointers = {"PARTIAL": "*fp32", "B": f"*{dtype}", "Y": f"*{dtype}"}
    signature = aot_signature(_sum_splits_kernel, pointers, constexprs)
    return AotConfig(f"{dtype} BLOCK={_SUM_BLOCK}", signature, constexprs, _SUM_WARPS, 1, ("N",))


register_aot(
    _skinny_linear_kernel,
    [_gemv_aot_config(torch_dtype, final) for torch_dtype, final in itertools.product(TRITON_DTYPE, (True, False))],
)
register_aot(_sum_splits_kernel, [_sum_aot_config(torch_dtype) for torch_dtype in TRITON_DTYPE])
