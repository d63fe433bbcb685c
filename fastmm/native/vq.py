"""Native (C++ / CPU) launcher of the `vq` family's kernel: nearest-code search without the N x K matrix.

fastmm._C.nearest_code keeps a running (best score, index) per row over packed tiles of the codebook, so its
extra memory is O(N + K) plus fixed-size tiles, and reads z through its strides (a channels-first map is never
copied). The algorithm is described in csrc/vq.cpp. Inputs arrive validated by fastmm.ops; the checks here
only keep raw pointers in bounds when the kernel is called past it.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import DTYPE_CODE, fail, inside_storage


def _check_buffers(z: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor) -> None:
    """Last guard before raw pointers reach C++: z [B, S, D] on the CPU in a supported dtype, every element
    it addresses through its strides inside its storage; codebook [K, D] contiguous in z's dtype with K >= 1;
    codebook_sq [K] contiguous float32."""
    if z.device.type != "cpu" or z.dim() != 3 or z.dtype not in DTYPE_CODE:
        fail("vq", "z", "a [B, S, D] CPU float32, float16 or bfloat16 tensor", z)
    if any(s < 0 for s in z.stride()):
        fail("vq", "z", "strided with non-negative strides", z)
    if not inside_storage(z):
        fail("vq", "z", "a view inside its storage", z)
    D = z.shape[2]
    if codebook.device.type != "cpu" or not codebook.is_contiguous() or codebook.dtype != z.dtype:
        fail("vq", "codebook", f"a contiguous CPU {z.dtype} tensor", codebook)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] != D:
        fail("vq", "codebook", f"[K, D] with K >= 1 and D = z.shape[2] = {D}", codebook)
    K = codebook.shape[0]
    if (codebook_sq.device.type != "cpu" or not codebook_sq.is_contiguous() or codebook_sq.dtype != torch.float32
            or tuple(codebook_sq.shape) != (K,)):  # fmt: skip
        fail("vq", "codebook_sq", f"a contiguous CPU float32 tensor of shape ({K},)", codebook_sq)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor) -> torch.Tensor:
    """argmin_k (codebook_sq[k] - 2 z[b, s].codebook[k]) for every row of z.

    z [B, S, D] float32 / float16 / bfloat16, any non-negative strides (a channels-first map [B, D, H, W]
    arrives as the view z.flatten(2).transpose(1, 2) and is read in place); codebook [K, D] contiguous in z's
    dtype, K >= 1; codebook_sq [K] float32. Returns indices [B, S] int64. Scores in fp32 (16-bit inputs
    widened, fp32 accumulation), lowest index on ties, a NaN score never wins (an all-NaN row gets 0).
    """
    _check_buffers(z, codebook, codebook_sq)
    B, S, D = z.shape
    indices = torch.empty(B, S, dtype=torch.int64)
    if B * S:
        _C.nearest_code(
            z.data_ptr(), B, S, D, *z.stride(), codebook.data_ptr(), codebook_sq.data_ptr(), codebook.shape[0],
            indices.data_ptr(), DTYPE_CODE[z.dtype], torch.get_num_threads(),
        )  # fmt: skip
    return indices
