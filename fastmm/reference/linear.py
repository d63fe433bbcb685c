"""Reference semantics of the `linear` family: y = x weight^T + bias, as torch.nn.functional.linear.

The spec of fastmm.ops.linear and the kernel interface every backend module (fastmm.<backend>.linear)
implements: x [M, K], weight [N, K], bias [N] or None, one dtype; returns [M, N] in that dtype. Math in fp32
(fp64 for fp64 inputs, which the tests use as ground truth), one cast at the end. K = 0 gives the bias (or
zeros) in every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Kernel interface. x [M, K] and weight [N, K] with any strides, bias [N] or None, all in one dtype.
    Returns y [M, N] contiguous in x's dtype, fp32 accumulation."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc)).to(x.dtype)
