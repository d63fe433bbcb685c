"""Native (C++ / CPU) launcher of the `sampling` family's kernel: fused classifier-free-guidance sampling.

fastmm._C.cfg_sample runs one row per thread and recomputes the guided scores in each of its few passes
instead of storing them, so it allocates nothing: with ``out`` given, a decode step's sampling allocates no
memory at all. The algorithm is described in csrc/sampling.cpp. Inputs arrive validated by fastmm.ops; the
checks here only keep raw pointers in bounds when the kernel is called past it.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import DTYPE_CODE, fail, inside_storage, threads_for


def _check_buffers(logits: torch.Tensor, groups: int, offset: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """Last guard before raw pointers reach C++: logits [groups * B, V] on the CPU in a supported dtype, B >= 1,
    unit stride along V and rows apart by at least V, every row inside its storage; offset one int64 on the
    CPU; out [B] contiguous int64 on the CPU. (is_cpu rather than device.type: this runs every decode step.)"""
    if not logits.is_cpu or logits.dim() != 2 or logits.dtype not in DTYPE_CODE:
        fail("sampling", "logits", "a [G*B, V] CPU float32, float16 or bfloat16 tensor", logits)
    (rows, vocab), (row_stride, col_stride) = logits.shape, logits.stride()
    if not 1 <= groups <= 3 or rows < groups or rows % groups or not 1 <= vocab < 2**31:
        fail("sampling", "logits", f"[G*B, V] with G = {groups}, B >= 1 and 1 <= V < 2^31", logits)
    if col_stride != 1 or (rows > 1 and row_stride < vocab):
        fail("sampling", "logits", "rows with unit stride along V, at least V elements apart", logits)
    if not inside_storage(logits):
        fail("sampling", "logits", "a view inside its storage", logits)
    if offset is not None and (not offset.is_cpu or offset.dtype != torch.int64 or offset.numel() != 1):
        fail("sampling", "offset", "one int64 on the CPU", offset)
    batch = rows // groups
    if out is not None and (not out.is_cpu or out.dtype != torch.int64 or out.shape != (batch,)
                            or not out.is_contiguous()):  # fmt: skip
        fail("sampling", "out", f"a contiguous CPU int64 tensor of shape ({batch},)", out)


def cfg_sample_fwd(
    logits: torch.Tensor,
    scales: tuple[float, ...],
    temperature: float,
    top_k: int,
    top_p: float,
    lo: int,
    hi: int,
    log_softmax: bool,
    seed: int,
    offset: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Guided sample of one id per row: fastmm.reference.sampling.cfg_sample_fwd's semantics and RNG, bit for bit
    for mix "logits" (log_softmax and top-p sum in another order: near-ties may differ).

    logits [G*B, V] float32 / float16 / bfloat16, G = len(scales) + 1, unit stride along V; 0 <= lo < hi <= V;
    temperature >= 0 (0: greedy); top_k >= 0 (0: off); top_p in (0, 1] (1: off); seed in [0, 2^32); offset
    None (step 0) or one int64, read by the kernel; out None or int64 [B] to write. Returns ids [B] int64.
    """
    groups = len(scales) + 1
    _check_buffers(logits, groups, offset, out)
    batch = logits.shape[0] // groups
    if out is None:
        out = torch.empty(batch, dtype=torch.int64)
    scale0, scale1 = (*map(float, scales), 0.0, 0.0)[:2]
    row_stride = logits.stride(0) if batch * groups > 1 else logits.shape[1]  # one row: any stride is fine
    _C.cfg_sample(
        logits.data_ptr(), batch, groups, logits.shape[1], row_stride, scale0, scale1, temperature, top_k, top_p,
        lo, hi, log_softmax, seed, 0 if offset is None else offset.data_ptr(), out.data_ptr(), DTYPE_CODE[logits.dtype],
        threads_for(logits.shape[0] * logits.shape[1]),
    )  # fmt: skip
    return out
