"""Reference semantics of the `prune` family: what visual-token pruning (FastV, VTW, PyramidDrop) needs from
kernels, without ever holding attention probabilities for the whole sequence.

attention_importance: the attention mass that a few query rows pay each key of the image spans, averaged over
heads and rows. FastV ranks image tokens by it (the last token's row); "text" raters average every text row.
With the rows' log-sum-exp (which span attention computes anyway) one probability is one exponential:

    p[h, r, j] = exp(q[h, r] . k[h // G, j] * scale - lse[h, r])      for row_start[r] <= j < row_end[r], else 0
    score[j]   = sum over h, r of p[h, r, j]                          (the ops layer divides by Hq * rows)

so the cost is O(rows * heads * span * d) and the memory O(span): no [L, L] or [H, L, L] tensor.

compact_tokens: keep the selected tokens of each row, in order, in the first count[b] slots of a buffer of fixed
capacity, with their original positions (RoPE positions keep their gaps) and the index each slot came from
(to gather any other per-token tensor). Slots past the count hold zeros, position 0 and source -1. The count
stays on the device: no host sync, so a pruned step can be graph-captured.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------- kernel interface
#
# Tensors arrive validated and contiguous from fastmm.ops.prune.
# attention_importance_fwd: q_rows [B, Hq, R, d] and k [B, Hkv, S, d] in one float dtype (Hq a multiple of Hkv);
# row_start, row_end [B, R] int32 with 0 <= row_start <= row_end <= S (an empty range: a padding row); lse
# [B, Hq, R] fp32 (-inf where a row attends nothing: it then contributes nothing); span_index [B, n] int32 with
# values in [-1, S) (-1: a padding column, score 0); scale a float. Returns [B, n] fp32, summed over heads and
# rows (not averaged).
# compact_tokens_fwd: hidden [B, L, D] float, positions [B, L] int64, keep [B, L] bool, capacity >= 0 with at
# most `capacity` kept tokens per row (checked by the ops layer; a kernel still never writes past the buffer,
# keeping the first `capacity`). Returns (hidden [B, capacity, D], positions [B, capacity] int64, count [B] int32,
# source [B, capacity] int64).


def attention_importance_fwd(q_rows, k, row_start, row_end, lse, span_index, scale):
    B, Hq, R, d = q_rows.shape
    Hkv = k.shape[1]
    n = span_index.shape[1]
    columns = span_index.long().clamp(min=0)  # padding columns read key 0 and are zeroed below
    keys = k.float().gather(2, columns[:, None, :, None].expand(B, Hkv, n, d))  # [B, Hkv, n, d]
    grouped = q_rows.float().view(B, Hkv, Hq // Hkv, R, d)
    logits = torch.einsum("bhgrd,bhnd->bhgrn", grouped, keys).reshape(B, Hq, R, n) * scale
    probs = torch.exp(logits - lse.float()[..., None])
    key = span_index.long()[:, None, :]  # [B, 1, n]
    inside = (key >= row_start.long()[:, :, None]) & (key < row_end.long()[:, :, None])  # [B, R, n]
    inside &= key >= 0
    # A row whose softmax had no key (lse = -inf: empty range, or every key masked) contributes nothing.
    attends = ~torch.isneginf(lse.float())[..., None]  # [B, Hq, R, 1]
    probs = probs.masked_fill(~inside[:, None] | ~attends, 0.0)
    return probs.sum(dim=(1, 2))


def compact_tokens_fwd(hidden, positions, keep, capacity):
    B, L, D = hidden.shape
    keep = keep.bool()
    slot = torch.cumsum(keep.long(), dim=1) - 1  # the slot of each kept token
    taken = keep & (slot < capacity)
    count = taken.sum(dim=1).to(torch.int32)
    rows = torch.arange(B, device=hidden.device)[:, None].expand(B, L)
    tokens = torch.arange(L, device=hidden.device)[None, :].expand(B, L)
    out = hidden.new_zeros(B, capacity, D)
    out_positions = positions.new_zeros(B, capacity)
    source = torch.full((B, capacity), -1, dtype=torch.int64, device=hidden.device)
    out[rows[taken], slot[taken]] = hidden[taken]
    out_positions[rows[taken], slot[taken]] = positions[taken]
    source[rows[taken], slot[taken]] = tokens[taken]
    return out, out_positions, count, source
