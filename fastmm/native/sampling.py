"""Native (C++ / CPU) launcher of the `sampling` family's kernel: fused classifier-free-guidance sampling.

fastmm._C.cfg_sample runs one row per thread and recomputes the guided scores in each of its few passes
instead of storing them, so it allocates nothing: with ``out`` given, a decode step's sampling allocates no
memory at all. The algorithm is described in csrc/sampling.cpp. Inputs arrive validated by fastmm.ops; the
kernel's entry point checks its tensors again (csrc/tensor_arg.h), for callers past it.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import threads_for


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
    None (step 0) or int64 [1], read by the kernel; out None or int64 [B] to write. Returns ids [B] int64.
    """
    if out is None:
        out = torch.empty(logits.shape[0] // (len(scales) + 1), dtype=torch.int64)
    _C.cfg_sample(logits, offset, out, scales, temperature, top_k, top_p, lo, hi, log_softmax, seed,
                  threads_for(logits.numel()))  # fmt: skip
    return out


def jacobi_verify_fwd(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    start: torch.Tensor,
    limit: int,
    scales: list[float],
    temperature: float,
    top_k: int,
    top_p: float,
    lo: int,
    hi: int,
    log_softmax: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One speculative Jacobi verification: fastmm.reference.sampling.jacobi_verify_fwd's semantics and RNG.

    fastmm._C.jacobi_verify computes each (image, slot) row's p, acceptance test and redraft on its own thread,
    then per image the accepted run and the correction. p is a softmax like torch's but with its own exp and
    order of summation (last-bit differences), so tests and races can resolve differently only at near-ties.
    logits [G*N, W, V] contiguous; drafts [N, W] int64 in [lo, hi); draft_probs [N, W, hi - lo] fp32; start [N]
    int64. Returns (count [N] int64, tokens [N, W] int64, probs [N, W, hi - lo] fp32).
    """
    N, W = drafts.shape
    count = torch.empty(N, dtype=torch.int64)
    tokens = torch.empty(N, W, dtype=torch.int64)
    probs = torch.empty(N, W, hi - lo, dtype=torch.float32)
    _C.jacobi_verify(logits, drafts, draft_probs, start, count, tokens, probs, list(scales), temperature, top_k,
                     top_p, lo, hi, log_softmax, seed, limit, threads_for(logits.numel()))  # fmt: skip
    return count, tokens, probs
