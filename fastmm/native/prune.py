"""Native (CPU) launchers of the `prune` family: visual-token pruning (csrc/prune.cpp; semantics in
fastmm.reference.prune).

attention_importance_fwd sums, for each scored key, the probabilities that a few query rows pay it, one
exponential each from the rows' log-sum-exp; compact_tokens_fwd packs each row's kept tokens into a buffer of
fixed capacity. Inputs arrive validated and contiguous from fastmm.ops.prune; the kernels write every element of
their outputs, so the outputs are allocated uninitialized.
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import threads_for


def attention_importance_fwd(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    row_start: torch.Tensor,
    row_end: torch.Tensor,
    lse: torch.Tensor,
    span_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """[B, n] fp32: each scored key's probabilities summed over heads and rows (the reference's kernel interface)."""
    B, Hq, R, d = q_rows.shape
    n = span_index.shape[1]
    out = torch.empty(B, n, dtype=torch.float32)
    threads = threads_for(B * Hq * R * n * d)  # the multiply-adds of the scores
    _C.attention_importance_fwd(q_rows, k, row_start, row_end, lse, span_index, out, float(scale), threads)
    return out


def compact_tokens_fwd(
    hidden: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [B, capacity, D], positions [B, capacity] int64, count [B] int32, source [B, capacity] int64):
    each row's kept tokens in order in slots [0, count[b]); zeros, position 0 and source -1 past the count."""
    B, _, D = hidden.shape
    hidden_out = torch.empty(B, capacity, D, dtype=hidden.dtype)
    positions_out = torch.empty(B, capacity, dtype=torch.int64)
    count = torch.empty(B, dtype=torch.int32)
    source = torch.empty(B, capacity, dtype=torch.int64)
    threads = threads_for(hidden_out.numel())
    _C.compact_tokens_fwd(hidden, positions, keep, hidden_out, positions_out, count, source, threads)
    return hidden_out, positions_out, count, source
