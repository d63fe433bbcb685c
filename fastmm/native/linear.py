"""Native (C++ / CPU) launcher of the `linear` family: y = x weight^T + bias for the skinny x of decode steps.

At M <= ``SKINNY_MAX_ROWS`` rows of x, fastmm._C.skinny_linear reads each weight row once for all M rows, at
memory bandwidth (csrc/linear.cpp); MKL's sgemm, behind F.linear, reads the weights at a fraction of it there.
Larger M (prefill) goes to F.linear, whose blocked GEMM reuses each weight block across many rows. Inputs
arrive validated by fastmm.ops; the checks here only keep raw pointers in bounds when the kernel is called
past it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmm import _C
from fastmm.native._shared import DTYPE_CODE, fail, inside_storage

# Rows of x up to which the skinny kernel runs: every decode step (one row per sequence, two per sequence with
# classifier-free guidance, up to 16 sequences). It marks the end of decode sizes, not a measured crossover: on
# the 2-thread AMD EPYC development host MKL's sgemm stayed behind the skinny kernel (then bound by FMAs, M per
# weight element) up to M = 64-128 (2048 x 2048: 3.1 vs 3.8 ms at M = 64, a tie at 128).
SKINNY_MAX_ROWS = 16
# bf16 is the exception: there F.linear is oneDNN's AVX512_BF16 GEMM, which catches up with the skinny kernel
# (one weight row per pass, vdpbf16ps) around M = 4 and passes it at M = 8. `fastmm bench linear`, rows
# `native_skinny` (2-thread AMD EPYC, 2026-11-23 17:55 UTC, decoder and head shapes at hidden 512 and 2048):
# the kernel is 1.1-2.6x F.linear at M = 2, faster on 6 of 9 shapes at M = 4 (0.69-2.16x) and slower on 6 of
# 9 at M = 8 (0.56-1.32x).
SKINNY_MAX_ROWS_BF16 = 4


def _check_buffers(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Last guard before raw pointers reach C++: x [M, K] and weight [N, K] CPU tensors of one supported dtype,
    unit stride along K, non-negative row strides, every row inside its storage; bias None or [N] contiguous
    in that dtype. Written for speed (about 2 us): at decode sizes it runs once per projection per token."""
    if not x.is_cpu or x.dim() != 2 or x.dtype not in DTYPE_CODE:
        fail("linear", "x", "a [M, K] CPU float32, float16 or bfloat16 tensor", x)
    K, (x_row_stride, x_col_stride) = x.shape[1], x.stride()
    if (K > 1 and x_col_stride != 1) or x_row_stride < 0 or not inside_storage(x):
        fail("linear", "x", "rows with unit stride along K inside its storage", x)
    if not weight.is_cpu or weight.dtype != x.dtype or weight.dim() != 2 or weight.shape[1] != K:
        fail("linear", "weight", f"a [N, K = {K}] CPU {x.dtype} tensor", weight)
    N, (w_row_stride, w_col_stride) = weight.shape[0], weight.stride()
    if (K > 1 and w_col_stride != 1) or w_row_stride < 0 or not inside_storage(weight):
        fail("linear", "weight", "rows with unit stride along K inside its storage", weight)
    if bias is not None and (not bias.is_cpu or bias.dtype != x.dtype or bias.shape != (N,)
                             or not bias.is_contiguous()):  # fmt: skip
        fail("linear", "bias", f"None or a contiguous CPU {x.dtype} tensor of shape ({N},)", bias)


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x weight^T + bias.

    x [M, K] and weight [N, K] float32 / float16 / bfloat16 in one dtype, bias [N] or None. Returns y [M, N]
    contiguous in that dtype, fp32 accumulation. M <= SKINNY_MAX_ROWS (bf16: SKINNY_MAX_ROWS_BF16) runs
    skinny_linear; larger M runs F.linear, and so does a weight whose elements along K are not adjacent (such as
    a transposed view), which F.linear reads in place.
    """
    K = x.shape[1]
    max_rows = SKINNY_MAX_ROWS_BF16 if x.dtype == torch.bfloat16 else SKINNY_MAX_ROWS
    if x.shape[0] > max_rows or (K > 1 and weight.stride()[1] != 1):
        return F.linear(x, weight, bias)
    return skinny_linear(x, weight, bias)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The skinny kernel for any M (linear's arguments): rows are read through their row stride, and x is
    copied only when its elements along K are not adjacent."""
    (M, K), N = x.shape, weight.shape[0]
    if K > 1 and x.stride()[1] != 1:
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    _check_buffers(x, weight, bias)
    y = torch.empty(M, N, dtype=x.dtype)
    if M and N:
        _C.skinny_linear(
            x.data_ptr(), x.stride()[0], weight.data_ptr(), weight.stride()[0], 0 if bias is None else bias.data_ptr(),
            y.data_ptr(), M, K, N, DTYPE_CODE[x.dtype], torch.get_num_threads(),
        )  # fmt: skip
    return y
