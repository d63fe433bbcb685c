"""Op family `prune`: visual-token pruning (FastV, VTW, PyramidDrop) with flash-style attention.

Score-based pruning needs a few rows of attention probabilities, which flash-style kernels never store. Here
they come from the rows' log-sum-exp, which span_attention returns on request (``return_lse=True``): one
probability is one exponential, so scoring costs O(rows x span) and no [L, L] tensor exists. Dropping tokens
keeps the survivors in order with their original RoPE positions in a fixed-capacity buffer and a count per
row on the device (no host sync). Semantics: fastmm.reference.prune.

    scores = attention_importance(q, k, kv_start, kv_end, rows, span_start, span_end, lse=lse)   # [B, n]
    keep = top_k_mask(scores, kept_per_row, valid=columns >= 0)                                  # [B, n]
    packed = compact_tokens(hidden, positions, token_keep, capacity)   # .hidden .positions .count .source
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastmm import _validate as val
from fastmm.ops._spec import kernel_op
from fastmm.reference import attention as attention_reference

Tensor = torch.Tensor


@kernel_op("prune", "attention_importance")
def attention_importance_fwd(
    q_rows: Tensor, k: Tensor, row_start: Tensor, row_end: Tensor, lse: Tensor, span_index: Tensor, scale: float
) -> Tensor:
    return q_rows.new_empty(q_rows.shape[0], span_index.shape[1], dtype=torch.float32)


@kernel_op("prune", "compact_tokens")
def compact_tokens_fwd(
    hidden: Tensor, positions: Tensor, keep: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, _, D = hidden.shape
    return (
        hidden.new_empty(B, capacity, D),
        positions.new_empty(B, capacity),
        positions.new_empty(B, dtype=torch.int32),
        positions.new_empty(B, capacity, dtype=torch.int64),
    )


class CompactTokens(NamedTuple):
    """compact_tokens' result: row b's kept tokens in slots [0, count[b]), in their original order."""

    hidden: Tensor  # [B, capacity, D]; zeros past the count
    positions: Tensor  # [B, capacity]: each kept token's original position; 0 past the count
    count: Tensor  # [B] int32, on the device
    source: Tensor  # [B, capacity] int64: the index in the input each slot came from; -1 past the count


# ------------------------------------------------------------------------------------------- helpers


def _int_matrix(op: str, name: str, t: object, batch: int) -> Tensor:
    """t as [B, P] (a [B] tensor becomes [B, 1]) after checking it is an integer tensor with B rows."""
    t = val.check_tensor(op, name, t)
    val.check_ids(op, name, t)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != batch:
        raise ValueError(f"{op}: {name} must be [B] or [B, P] with B = {batch}, got shape {tuple(t.shape)}")
    return t


def _check_values(op: str, ok: Tensor, message: str, got) -> None:
    """ok (a bool tensor) holds everywhere: read on the host, or asserted on the device."""
    mode = val.value_check_mode(ok) if ok.numel() else None
    if mode == "device":
        val.assert_on_device(ok, message)
    elif mode == "host" and not bool(ok.all()):
        raise ValueError(f"{message}, got {got()}")


def span_keys(span_start: Tensor, span_end: Tensor) -> Tensor:
    """The key index of every score column: [B, n] int64, the spans' keys in order, -1 past a row's total.

    span_start, span_end: [B] or [B, P] (P spans per row; an empty span (start == end) is padding). n is the
    largest total over the rows, read on the host.
    """
    op = "span_keys"
    val.check_tensor(op, "span_start", span_start)
    span_start = _int_matrix(op, "span_start", span_start, span_start.shape[0] if span_start.dim() else -1)
    span_end = _int_matrix(op, "span_end", span_end, span_start.shape[0])
    val.check_shape(op, "span_end", span_end, tuple(span_start.shape), "span_start's shape")
    val.check_same_device(op, "span_start", span_start, span_end=span_end)
    start, end = span_start.long(), span_end.long()
    _check_values(op, end >= start, f"{op}: every span needs span_end >= span_start",
                  lambda: f"{int((end < start).sum())} spans with span_end < span_start")  # fmt: skip
    sizes = end - start  # [B, P]
    ends = torch.cumsum(sizes, dim=1)  # column where each span's keys end
    width = int(ends[:, -1].max()) if ends.numel() else 0
    column = torch.arange(width, device=start.device).expand(start.shape[0], width)
    span = torch.searchsorted(ends, column.contiguous(), right=True).clamp(max=max(start.shape[1] - 1, 0))
    key = start.gather(1, span) + column - (ends - sizes).gather(1, span)
    return torch.where(column < ends[:, -1:], key, torch.full_like(key, -1))


# ------------------------------------------------------------------------------- attention_importance


def attention_importance(
    q: Tensor,
    k: Tensor,
    kv_start: Tensor | None,
    kv_end: Tensor | None,
    rows: Tensor,
    span_start: Tensor,
    span_end: Tensor,
    scaling: float | None = None,
    *,
    lse: Tensor | None = None,
) -> Tensor:
    """The attention mass each key of the image spans receives from the query rows ``rows``, averaged over the
    query heads and those rows: FastV's score, flash-style (O(L) memory, no probabilities stored).

    Args:
        q: [B, Hq, L, d] the layer's queries (RoPE applied); k: [B, Hkv, S, d] its keys, Hq a multiple of Hkv.
        kv_start, kv_end: [B, L] the key ranges span_attention ran with (both None: causal, as there).
        rows: [B] or [B, R] integer query indices in [0, L); -1 marks a padding entry (rows of a batch may
            rate with different numbers of rows). A row with no rows scores 0.
        span_start, span_end: [B] or [B, P] integer key spans [start, end) in [0, S] (P spans per row, empty
            ones are padding): the keys scored.
        scaling: the softmax scale span_attention ran with (default d ** -0.5).
        lse: [B, Hq, L] fp32, span_attention(..., return_lse=True)'s second output for the same q, k, ranges
            and scale; None computes it for the rows alone (one [R, S] product per head: O(R L) memory).

    Returns:
        [B, n] fp32, column c the score of key span_keys(span_start, span_end)[b, c]; 0 for padding columns.
        A key outside a row's range gets nothing from it (softmax probability 0).
    """
    op = "attention_importance"
    for name, t in (("q", q), ("k", k)):
        val.check_tensor(op, name, t)
        val.check_float(op, name, t)
        val.check_dim(op, name, t, 4, "[B, H, L, d]")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k must have q's dtype {q.dtype}, got {k.dtype}")
    B, Hq, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"{op}: k must be [B = {B}, Hkv, S, d = {d}], got shape {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{op}: q's heads Hq = {Hq} must be a multiple of k's heads Hkv = {Hkv} (GQA)")
    val.check_same_device(op, "q", q, k=k)
    if (kv_start is None) != (kv_end is None):
        raise ValueError(f"{op}: give both kv_start and kv_end, or neither (causal)")
    if kv_start is None:
        if L > S:
            raise ValueError(f"{op}: causal ranges need L <= S, got L = {L} queries and S = {S} keys")
        kv_start, kv_end = attention_reference.causal_ranges(B, L, S, q.device)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        val.check_tensor(op, name, t)
        val.check_ids(op, name, t)
        val.check_shape(op, name, t, (B, L), "[B, L]: one key range per query")
        val.check_same_device(op, "q", q, **{name: t})
    start, end = kv_start.long(), kv_end.long()
    _check_values(op, (start >= 0) & (end <= S) & (start <= end),
                  f"{op}: key ranges must satisfy 0 <= kv_start <= kv_end <= S = {S}",
                  lambda: f"kv_start in [{int(start.min())}, {int(start.max())}], kv_end in [{int(end.min())}, {int(end.max())}]")  # fmt: skip
    rows = _int_matrix(op, "rows", rows, B)
    val.check_same_device(op, "q", q, rows=rows)
    rows = rows.long()
    _check_values(op, (rows >= -1) & (rows < L), f"{op}: rows must be query indices in [0, L = {L}) or -1 (padding)",
                  lambda: f"values in [{int(rows.min())}, {int(rows.max())}]")  # fmt: skip
    span_start = _int_matrix(op, "span_start", span_start, B)
    span_end = _int_matrix(op, "span_end", span_end, B)
    val.check_same_device(op, "q", q, span_start=span_start, span_end=span_end)
    _check_values(op, (span_start >= 0) & (span_end <= S), f"{op}: spans must lie in [0, S = {S}]",
                  lambda: f"span_start >= {int(span_start.min())}, span_end <= {int(span_end.max())}")  # fmt: skip
    if scaling is None:
        scaling = d**-0.5
    elif not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be None or a finite float, got {scaling!r}")
    if lse is not None:
        val.check_tensor(op, "lse", lse)
        if lse.dtype != torch.float32:
            raise TypeError(f"{op}: lse must be float32 (span_attention's log-sum-exp), got {lse.dtype}")
        val.check_shape(op, "lse", lse, (B, Hq, L), "[B, Hq, L]: span_attention(..., return_lse=True)'s lse")
        val.check_same_device(op, "q", q, lse=lse)

    columns = span_keys(span_start, span_end)
    valid = rows >= 0
    safe = rows.clamp(min=0)
    q_rows = q.gather(2, safe[:, None, :, None].expand(B, Hq, safe.shape[1], d)).contiguous()
    # A padding row gets the empty range [0, 0): it scores nothing.
    row_start = torch.where(valid, start.gather(1, safe), 0).int().contiguous()
    row_end = torch.where(valid, end.gather(1, safe), 0).int().contiguous()
    if lse is None:
        row_lse = _rows_log_sum_exp(q_rows, k, row_start, row_end, float(scaling))
    else:
        row_lse = lse.gather(2, safe[:, None, :].expand(B, Hq, safe.shape[1])).contiguous()
    summed = attention_importance_fwd(q_rows, k.contiguous(), row_start, row_end, row_lse,
                                      columns.int().contiguous(), float(scaling))  # fmt: skip
    per_row = (Hq * valid.sum(dim=1)).clamp(min=1).float()
    return summed / per_row[:, None]


def _rows_log_sum_exp(q_rows: Tensor, k: Tensor, row_start: Tensor, row_end: Tensor, scale: float) -> Tensor:
    """[B, Hq, R] fp32 log-sum-exp of each rated row's logits over its key range, -inf for an empty range: one
    [R, S] product per head (O(R L) memory). The attention kernels are tiled for many queries; for the few rows a
    rater has, one GEMM is the faster way to these statistics."""
    B, Hq, R, d = q_rows.shape
    Hkv, S = k.shape[1], k.shape[2]
    grouped = q_rows.float().view(B, Hkv, Hq // Hkv * R, d)
    logits = (grouped @ k.float().transpose(-1, -2)).view(B, Hq, R, S) * scale
    j = torch.arange(S, device=k.device)
    inside = (j >= row_start.long()[..., None]) & (j < row_end.long()[..., None])  # [B, R, S]
    return torch.logsumexp(logits.masked_fill(~inside[:, None], float("-inf")), dim=-1)


# --------------------------------------------------------------------------------------------- top-k


def top_k_mask(scores: Tensor, k: int | Tensor, valid: Tensor | None = None) -> Tensor:
    """Per row, True at the k[b] highest scores among the valid columns (ties: the lower column first).

    Args:
        scores: [B, n] floats. k: an int or [B] integer counts (more than a row's valid columns keeps them all).
        valid: [B, n] bool, False for padding columns (never kept); None: all valid.

    Returns:
        [B, n] bool, computed on the device (no host sync).
    """
    op = "top_k_mask"
    val.check_tensor(op, "scores", scores)
    val.check_float(op, "scores", scores)
    val.check_dim(op, "scores", scores, 2, "[B, n]")
    B, n = scores.shape
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    val.check_tensor(op, "valid", valid)
    if valid.dtype != torch.bool:
        raise TypeError(f"{op}: valid must be a bool tensor, got {valid.dtype}")
    val.check_shape(op, "valid", valid, (B, n), "scores' shape [B, n]")
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"{op}: k must be >= 0, got {k}")
        k = torch.full((B,), k, dtype=torch.int64, device=scores.device)
    else:
        val.check_tensor(op, "k", k)
        val.check_ids(op, "k", k)
        val.check_shape(op, "k", k, (B,), "[B]: one count per row")
        _check_values(op, k >= 0, f"{op}: k must be >= 0", lambda: f"minimum {int(k.min())}")
    val.check_same_device(op, "scores", scores, valid=valid, k=k)
    _check_values(op, ~(valid & scores.isnan()), f"{op}: scores must not be NaN in valid columns",
                  lambda: "NaN")  # fmt: skip
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(B, n))
    return (rank < k.long()[:, None]) & valid


# ------------------------------------------------------------------------------------- compact_tokens


def compact_tokens(hidden: Tensor, positions: Tensor, keep: Tensor, capacity: int) -> CompactTokens:
    """Keep the tokens of each row where ``keep`` is True, in order, in the first count[b] of ``capacity`` slots.

    Args:
        hidden: [B, L, D] float. positions: [B, L] integer RoPE positions (they travel with their tokens, so the
            gaps left by dropped tokens stay gaps). keep: [B, L] bool.
        capacity: slots per row; a row keeping more is an error (checked on the host for CPU tensors, asserted
            on the device for CUDA ones). Fixed capacities keep shapes static for CUDA graphs.

    Returns:
        CompactTokens(hidden [B, capacity, D], positions [B, capacity] int64, count [B] int32, source
        [B, capacity] int64); gather any other per-token tensor with ``source`` (clamped at 0: slots past the
        count hold -1).
    """
    op = "compact_tokens"
    val.check_tensor(op, "hidden", hidden)
    val.check_float(op, "hidden", hidden)
    val.check_dim(op, "hidden", hidden, 3, "[B, L, D]")
    B, L, _ = hidden.shape
    val.check_tensor(op, "positions", positions)
    val.check_ids(op, "positions", positions)
    val.check_shape(op, "positions", positions, (B, L), "[B, L]: one position per token")
    val.check_tensor(op, "keep", keep)
    if keep.dtype != torch.bool:
        raise TypeError(f"{op}: keep must be a bool tensor (True = kept), got {keep.dtype}")
    val.check_shape(op, "keep", keep, (B, L), "[B, L]: one flag per token")
    val.check_same_device(op, "hidden", hidden, positions=positions, keep=keep)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(f"{op}: capacity must be an int >= 0, got {capacity!r}")
    kept = keep.sum(dim=1)
    _check_values(op, kept <= capacity, f"{op}: a row keeps more tokens than capacity = {capacity}",
                  lambda: f"up to {int(kept.max())} kept tokens")  # fmt: skip
    return CompactTokens(*compact_tokens_fwd(hidden.contiguous(), positions.long().contiguous(), keep.contiguous(),
                                             capacity))  # fmt: skip


def compact_key_ranges(kv_start: Tensor, kv_end: Tensor, keep: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """The key ranges of compact_tokens' slots: a range [s, e) over the original tokens becomes the range of the
    kept tokens inside it, [kept before s, kept before e), so causal text, bidirectional image spans and
    documents keep their meaning among the survivors. kv_start, kv_end, keep: [B, L]; source: [B, capacity]
    from compact_tokens. Returns int32 [B, capacity] ranges; slots past the count get [0, 0)."""
    op = "compact_key_ranges"
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end), ("source", source)):
        val.check_tensor(op, name, t)
        val.check_ids(op, name, t)
    B, L = keep.shape
    val.check_shape(op, "kv_start", kv_start, (B, L), "keep's shape [B, L]")
    val.check_shape(op, "kv_end", kv_end, (B, L), "keep's shape [B, L]")
    if source.dim() != 2 or source.shape[0] != B:
        raise ValueError(f"{op}: source must be [B = {B}, capacity], got shape {tuple(source.shape)}")
    kept_before = torch.nn.functional.pad(torch.cumsum(keep.long(), dim=1), (1, 0))  # [B, L + 1]
    slot_valid = source >= 0
    at = source.clamp(min=0)
    start = kept_before.gather(1, kv_start.long().gather(1, at))
    end = kept_before.gather(1, kv_end.long().gather(1, at))
    zero = torch.zeros_like(start)
    return torch.where(slot_valid, start, zero).int(), torch.where(slot_valid, end, zero).int()
