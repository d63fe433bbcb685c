"""Reference semantics of the `routed_linear` family: routed (per-modality) linear projections (mPLUG-Owl2).

mPLUG-Owl2 routes the K and V projections of every decoder layer by modality: every row t of x belongs to
modality m_t (0 = text, 1 = image, any small number allowed) and is multiplied by that modality's weight
only, y_t = weight[m_t] @ x_t + bias[m_t] (a grouped GEMM). Math in fp32 (fp64 for fp64 inputs, which the
tests use as ground truth), one cast to x's dtype at the end.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32, or fp64 when t is fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def routed_linear(
    x: torch.Tensor, modality: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y_t = weight[m_t] @ x_t + bias[m_t]. x [..., K]; modality [...]; weight [M, N, K]; bias [M, N].

    The reference loops over modalities with a boolean mask (never a row times a weight it does not use).
    """
    flat_x = _acc(x.reshape(-1, x.shape[-1]))
    flat_m = modality.reshape(-1).long()
    out = flat_x.new_zeros(flat_x.shape[0], weight.shape[1])
    for m in range(weight.shape[0]):
        rows = flat_m == m
        y_m = flat_x[rows] @ _acc(weight[m]).t()
        if bias is not None:
            y_m = y_m + _acc(bias[m])
        out[rows] = y_m
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[1])


# ---------------------------------------------------------------------------------------------------------
# Kernel interface: the functions every backend of this family exposes over flattened, contiguous tensors
# (x [T, K], modality [T] int64). Backward is the closed form below; the tests check it against autograd
# through the spec function above.
# ---------------------------------------------------------------------------------------------------------


def routed_linear_fwd(x, modality, weight, bias):
    return routed_linear(x, modality, weight, bias)


def routed_linear_bwd(dy, x, modality, weight, bias_present, need_dx, need_dweight):
    """dx_t = weight[m_t]^T dy_t, dweight[m] = sum over rows of modality m of dy_t x_t^T, dbias[m] = sum dy_t."""
    dyf, xf = dy.float(), x.float()
    num_modalities = weight.shape[0]
    dx = routed_linear(dy, modality, weight.transpose(1, 2)) if need_dx else None
    dweight = None
    if need_dweight:
        dweight = torch.stack([dyf[modality == m].t() @ xf[modality == m] for m in range(num_modalities)])
    dbias = None
    if bias_present:
        dbias = torch.zeros(weight.shape[:2], dtype=torch.float32, device=dy.device).index_add_(0, modality, dyf)
    return dx, dweight, dbias
