"""Reference semantics of the `vq` family: nearest-code quantization and code-to-embedding lookup.

The spec functions (``vq_quantize``, ``vq_embed``) define what the public ops return; the kernel-level
function below (``nearest_code``) is the interface every backend module (fastmm.<backend>.vq) implements.
Math in fp32, rows in chunks so that extra memory stays bounded (a chunk of rows times K scores), never
the whole N x K matrix.

Scores. For metric "l2", argmin_k |z - e_k|^2 = argmin_k (|e_k|^2 - 2 z.e_k): |z|^2 is the same for every
code of a row, so it is dropped. For metric "cosine", argmax_k (z/|z|).(e_k/|e_k|) = argmin_k -2 z.ê_k with
ê the normalized codes: |z| is again common to the row. So both metrics are one kernel,
argmin_k (codebook_sq[k] - 2 z.codebook[k]), with codebook_sq = |e|^2 (l2) or 0 (cosine, codes normalized).

Ties resolve to the lowest index (as torch.argmin). A NaN score never wins: a row of z containing NaN
scores NaN against every code and gets index 0, as torch.argmin gives on an all-NaN row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("l2", "cosine")
_CHUNK_SCORES = 1 << 22  # scores held at once: 16 MiB of fp32


def code_scores_inputs(codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, codebook_sq) that turn ``metric`` into argmin_k (codebook_sq[k] - 2 z.codes[k]).

    l2: the codebook itself and its fp32 squared norms. cosine: the fp32-normalized codes (rounded to the
    codebook's dtype) and zeros."""
    if metric == "l2":
        return codebook, codebook.float().pow(2).sum(dim=1)
    normalized = F.normalize(codebook.float(), dim=1)
    return normalized.to(codebook.dtype), normalized.new_zeros(codebook.shape[0])


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor) -> torch.Tensor:
    """Kernel interface. z [B, S, D] (any strides: channels-first maps arrive as a transposed view);
    codebook [K, D] contiguous, z's dtype; codebook_sq [K] fp32. Returns indices [B, S] int64 of
    argmin_k (codebook_sq[k] - 2 z[b, s].codebook[k]), fp32 math, lowest index on ties, NaN never wins."""
    B, S, D = z.shape
    rows = z.reshape(B * S, D)
    codes_t = codebook.float().t()
    indices = torch.empty(B * S, dtype=torch.int64, device=z.device)
    step = max(1, _CHUNK_SCORES // max(1, codebook.shape[0]))
    for start in range(0, B * S, step):
        scores = torch.addmm(codebook_sq[None, :], rows[start : start + step].float(), codes_t, alpha=-2.0)
        indices[start : start + step] = scores.masked_fill_(scores.isnan(), float("inf")).argmin(dim=1)
    return indices.view(B, S)


def as_rows(z: torch.Tensor) -> torch.Tensor:
    """z [N, D] -> [1, N, D]; channels-first z [B, D, H, W] -> the view [B, H*W, D] (no copy)."""
    if z.dim() == 2:
        return z.unsqueeze(0)
    return z.flatten(2).transpose(1, 2)


def vq_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    codebook_sq: torch.Tensor | None = None,
    return_quantized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Spec of fastmm.ops.vq_quantize: (indices [N] or [B, H, W] int64, quantized in z's shape and dtype or
    None). quantized = codes[indices] (normalized codes for cosine); no straight-through here."""
    codes, sq = code_scores_inputs(codebook.to(z.dtype), metric)
    if codebook_sq is not None and metric == "l2":
        sq = codebook_sq.float()
    rows = as_rows(z)
    indices = nearest_code(rows, codes, sq)
    out_indices = indices.view(-1) if z.dim() == 2 else indices.view(z.shape[0], *z.shape[2:])
    if not return_quantized:
        return out_indices, None
    picked = codes[indices]  # [B, S, D]
    quantized = picked.view(-1, z.shape[1]) if z.dim() == 2 else picked.transpose(1, 2).reshape(z.shape)
    return out_indices, quantized


def vq_embed(indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Spec of fastmm.ops.vq_embed: table[indices], shape [*indices.shape, E]."""
    return table[indices]
