"""Native (C++ / CPU) launcher of the `vq` family's kernel: nearest-code search without the N x K matrix.

fastmm._C.nearest_code keeps a running (best score, index) per row over packed tiles of the codebook, so its
extra memory is O(N + K) plus fixed-size tiles, and reads z through its strides (a channels-first map is never
copied). The algorithm is described in csrc/vq.cpp. Inputs arrive validated by fastmm.ops; the kernel's entry
point checks its tensors again, every strided access of z included (csrc/tensor_arg.h), for callers past it.
"""

from __future__ import annotations

import torch

from fastmm import _C


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor) -> torch.Tensor:
    """argmin_k (codebook_sq[k] - 2 z[b, s].codebook[k]) for every row of z.

    z [B, S, D] float32 / float16 / bfloat16, any non-negative strides (a channels-first map [B, D, H, W]
    arrives as the view z.flatten(2).transpose(1, 2) and is read in place); codebook [K, D] contiguous in z's
    dtype, K >= 1; codebook_sq [K] float32. Returns indices [B, S] int64. Scores in fp32 (16-bit inputs
    widened, fp32 accumulation), lowest index on ties, a NaN score never wins (an all-NaN row gets 0).
    """
    indices = torch.empty(z.shape[0], z.shape[1], dtype=torch.int64)
    _C.nearest_code(z, codebook, codebook_sq, indices, torch.get_num_threads())
    return indices
