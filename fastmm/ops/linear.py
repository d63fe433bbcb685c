"""Op family `linear`: y = x weight^T + bias for the skinny x of decode steps (M = 1..16 rows).

A decode step is a sequence of such products, each bound by one pass over its weights; GEMM libraries are
blocked for large M and stream the weights far below memory bandwidth there (see fastmm.native.linear).

``linear`` validates, views x as rows [M, K] (copying only when its leading dims cannot be merged) and calls
the kernel declared below (fastmm.ops._spec), the custom op ``fastmm::linear`` under torch.compile. It is an inference op without a backward: when autograd must record (grad enabled and x,
weight or bias requiring grad) it runs torch.nn.functional.linear instead, so training code keeps working.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastmm import _validate as v
from fastmm.ops._spec import kernel_op

Tensor = torch.Tensor


@kernel_op("linear", "linear")
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _check_inputs(op, x, weight, bias):
    v.check_tensor(op, "x", x)
    v.check_tensor(op, "weight", weight)
    v.check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., K], got a 0-d tensor")
    v.check_dim(op, "weight", weight, 2, "[N, K] (one row per output feature)")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype} (cast it once, not per call)")
    if bias is not None:
        v.check_tensor(op, "bias", bias)
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
        v.check_shape(op, "bias", bias, weight.shape[:1], "[N]: one per output feature")
    v.check_same_device(op, "x", x, weight=weight, bias=bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x weight^T + bias, as torch.nn.functional.linear, at memory bandwidth for the few rows of a decode step.

    Args:
        x: [..., K] float32 / float16 / bfloat16, any strides; leading dims may be empty.
        weight: [N, K] in x's dtype (an nn.Linear weight).
        bias: optional [N] in x's dtype.

    Returns:
        [..., N] in x's dtype, fp32 accumulation; K = 0 gives the bias (or zeros) in every row. With
        M = prod(x.shape[:-1]) <= 16 the native (CPU) and triton (GPU) kernels read each weight row once
        for all M rows; larger M (prefill) runs F.linear (MKL / cuBLAS). When autograd must record,
        F.linear runs instead (this op has no backward).
    """
    op = "linear"
    _check_inputs(op, x, weight, bias)
    records_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if records_grad and torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    # (M, K): a view unless the leading dims cannot merge. 2-D x skips the reshape and the view back (2 us).
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y = linear_fwd(rows, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
