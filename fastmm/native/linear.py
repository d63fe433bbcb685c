"""Native (C++ / CPU) launcher of the `linear` family: y = x weight^T + bias for the skinny x of decode steps.

At M <= ``SKINNY_MAX_ROWS`` rows of x, fastmm._C.skinny_linear reads each weight row once for all M rows, at
memory bandwidth (csrc/linear.cpp); MKL's sgemm, behind F.linear, reads the weights at a fraction of it there.
Larger M (prefill) goes to F.linear, whose blocked GEMM reuses each weight block across many rows. Inputs
arrive validated by fastmm.ops; the kernel's entry point checks its tensors again (csrc/tensor_arg.h), for
callers past it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmm import _C

# Rows of x up to which the skinny kernel runs: every decode step (one row per sequence, two per sequence with
# classifier-free guidance, up to 16 sequences). It marks the end of decode sizes, not a measured crossover: on
# the 2-thread AMD EPYC development host MKL's sgemm stayed behind the skinny kernel (then bound by FMAs, M per
# weight element) up to M = 64-128 (2048 x 2048: 3.1 vs 3.8 ms at M = 64, a tie at 128).
SKINNY_MAX_ROWS = 16
# bf16 is the exception where the CPU has AVX512_BF16: there F.linear is oneDNN's bf16 GEMM, which catches up
# with the skinny kernel (one weight row per pass, vdpbf16ps) around M = 4 and passes it at M = 8. `fastmm bench
# linear`, rows `native_skinny` (2-thread AMD EPYC, 2026-11-23 17:55 UTC, decoder and head shapes at hidden 512
# and 2048): the kernel is 1.1-2.6x F.linear at M = 2, faster on 6 of 9 shapes at M = 4 (0.69-2.16x) and slower
# on 6 of 9 at M = 8 (0.56-1.32x). Without it torch's bf16 GEMM is a slow path and the skinny kernel (weights
# widened in registers) stays ahead at every decode size.
SKINNY_MAX_ROWS_BF16 = 4 if torch.cpu.get_capabilities().get("avx512_bf16", False) else SKINNY_MAX_ROWS


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
    if M == 0 or N == 0:  # nothing to compute; and an empty view keeps strides the kernel's checks refuse
        return torch.empty(M, N, dtype=x.dtype)
    if K > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(M, N, dtype=x.dtype)  # sizes as ints: torch.Size slices and arguments cost more per call
    _C.skinny_linear(x, weight, bias, y, torch.get_num_threads())
    return y
