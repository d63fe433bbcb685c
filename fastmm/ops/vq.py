"""Op family `vq`: nearest-code quantization that never materializes N x K, and code-to-embedding lookup.

Every tokenizer in use (transformers' Chameleon, Janus and Emu3 quantizers, LlamaGen,
vector-quantize-pytorch) builds the whole N x K distance matrix, then takes argmin: 604 MB for a batch of 16
Janus images. The kernels here keep a running (min, argmin) over codebook tiles instead; both metrics reduce
to one kernel, argmin_k (codebook_sq[k] - 2 z.codes[k]) (see fastmm.reference.vq).

``vq_quantize`` validates, views z as rows [B, S, D] without copying (a channels-first map is read through
its strides), and calls the kernel ``nearest_code`` declared below (fastmm.ops._spec), the custom op
``fastmm::vq_nearest_code`` under torch.compile. Indices carry no gradient; ``quantized`` is straight-through
for z. The codebook's finiteness and vq_embed's index range are checked at every eager call: on the host for
CPU tensors, by a device-side assert without a host sync on CUDA (fastmm._validate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmm import _validate as v
from fastmm.ops._spec import finite, kernel_op
from fastmm.reference.vq import METRICS, as_rows, code_scores_inputs

Tensor = torch.Tensor


# The codebook's finiteness is checked on the codes the kernel reads, in z's dtype: a code that overflows
# there is as wrong as a NaN.
@kernel_op("vq", "vq_quantize", name="vq_nearest_code", checks=(finite("codebook"),))
def nearest_code(z: Tensor, codebook: Tensor, codebook_sq: Tensor) -> Tensor:
    return z.new_empty(z.shape[:2], dtype=torch.int64)


def _check_quantize_inputs(op, z, codebook, metric, codebook_sq):
    v.check_tensor(op, "z", z)
    v.check_tensor(op, "codebook", codebook)
    v.check_float(op, "z", z)
    v.check_float(op, "codebook", codebook)
    if z.dim() not in (2, 4):
        raise ValueError(f"{op}: z must be [N, D] or channels-first [B, D, H, W], got {v.describe(z)}")
    v.check_dim(op, "codebook", codebook, 2, "[K, D] (one row per code)")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook must hold at least one code, got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(
            f"{op}: codebook must be [K, D] with D = z.shape[1] = {z.shape[1]} (the channel dim), "
            f"got {tuple(codebook.shape)}"
        )
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if codebook_sq is not None:
        v.check_tensor(op, "codebook_sq", codebook_sq)
        if metric != "l2":
            raise ValueError(f"{op}: codebook_sq only applies to metric 'l2' (|e|^2), got metric {metric!r}")
        v.check_float(op, "codebook_sq", codebook_sq)
        v.check_shape(op, "codebook_sq", codebook_sq, codebook.shape[:1], "[K]: |e_k|^2 per code")
    v.check_same_device(op, "z", z, codebook=codebook, codebook_sq=codebook_sq)


def vq_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    codebook_sq: torch.Tensor | None = None,
    return_quantized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest codebook entry for every vector of z, without the N x K distance matrix.

    Args:
        z: [N, D] vectors, or a channels-first feature map [B, D, H, W] (read in place, any strides);
            float32 / float16 / bfloat16.
        codebook: [K, D] codes (cast to z's dtype if it differs). Must be finite.
        metric: "l2", argmin_k |z - e_k|^2 (Chameleon, Janus, Emu3 in transformers); or "cosine",
            argmax_k of the cosine between z and e_k (LlamaGen with l2-normalized codes).
        codebook_sq: optional [K] precomputed |e_k|^2 (metric "l2"), to skip an O(K D) pass per call.
        return_quantized: False skips the gather of the chosen codes.

    Returns:
        (indices, quantized): indices int64, [N] or [B, H, W]; quantized = codes[indices] in z's shape and
        dtype (for "cosine" the normalized codes), straight-through for z (z + (e - z).detach()), or None.
        Scores are fp32; ties go to the lowest index; a row of z containing NaN gets index 0.
        Extra memory: O(N + K) besides the outputs.
    """
    op = "vq_quantize"
    _check_quantize_inputs(op, z, codebook, metric, codebook_sq)
    if codebook_sq is not None:  # metric l2 (checked): the caller's cached |e|^2 saves an O(K D) pass
        codes, sq = codebook.to(z.dtype), codebook_sq.float()
    else:
        codes, sq = code_scores_inputs(codebook.to(z.dtype), metric)
    codes, sq = codes.contiguous(), sq.contiguous()
    rows = as_rows(z)  # (B, S, D): a view; channels-first z keeps its strides
    indices = nearest_code(rows, codes, sq)
    out_indices = indices.view(-1) if z.dim() == 2 else indices.view(z.shape[0], *z.shape[2:])
    if not return_quantized:
        return out_indices, None
    picked = F.embedding(indices, codes)  # (B, S, D)
    quantized = picked.view(-1, z.shape[1]) if z.dim() == 2 else picked.transpose(1, 2).reshape(z.shape)
    if z.requires_grad and torch.is_grad_enabled():
        quantized = z + (quantized - z).detach()
    return out_indices, quantized


def vq_embed(indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` for generated image tokens: table[indices].

    Janus computes aligner(gen_embed(id)) for every generated token; since that depends on the id alone,
    precompute ``table = aligner(gen_embed.weight)`` once ([K, hidden]) and gather one row per token.

    Args:
        indices: integer ids of any shape, each in [0, K).
        table: [K, E] rows, any float dtype.

    Returns:
        [*indices.shape, E] in table's dtype; differentiable with respect to table.
    """
    op = "vq_embed"
    v.check_tensor(op, "indices", indices)
    v.check_tensor(op, "table", table)
    v.check_ids(op, "indices", indices)
    v.check_float(op, "table", table)
    v.check_dim(op, "table", table, 2, "[K, E] (one row per code)")
    v.check_same_device(op, "table", table, indices=indices)
    v.check_id_range(op, "indices", indices, table.shape[0], "K = table.shape[0]")
    return F.embedding(indices.long(), table)
