"""Op family `routed_linear`: routed (per-modality) linear projections, y_t = x_t @ W[m_t]^T + b[m_t].

mPLUG-Owl2 routes the K and V projections of every decoder layer by modality (text = 0, image = 1). Its
reference finds each modality's rows with nonzero (a host sync), gathers, applies that modality's nn.Linear
and scatters back. This op reads each row's modality id inside the kernels instead: a grouped GEMM that
never multiplies a row by a weight it does not use.

The public function validates and flattens to [T, K]; the kernels declared below (fastmm.ops._spec) run the
chosen backend, through the custom op ``fastmm::routed_linear`` under torch.compile and when autograd records.
Modality ids are range-checked at every call: on the host for CPU tensors, by a device-side assert without a
host sync on CUDA (fastmm._validate.check_id_range).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmm import _validate as v
from fastmm.ops._spec import ids_below, kernel_op

Tensor = torch.Tensor


@kernel_op("routed_linear", "routed_linear", checks=(ids_below("modality", "weight", label="M"),))
def routed_linear_fwd(x: Tensor, modality: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@kernel_op("routed_linear", "routed_linear", name="routed_linear_backward")
def routed_linear_bwd(
    dy: Tensor, x: Tensor, modality: Tensor, weight: Tensor, bias_present: bool, need_dx: bool, need_dweight: bool
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    f32 = torch.float32
    return (
        torch.empty_like(x) if need_dx else None,
        weight.new_empty(weight.shape, dtype=f32) if need_dweight else None,
        weight.new_empty(weight.shape[:2], dtype=f32) if bias_present else None,
    )


def _setup(ctx, inputs, output):
    x, modality, weight, bias = inputs
    ctx.bias_present = bias is not None
    ctx.save_for_backward(x, modality, weight)


def _backward(ctx, dy):
    x, modality, weight = ctx.saved_tensors
    need_dx, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, dweight, dbias = routed_linear_bwd(dy.contiguous(), x, modality, weight, ctx.bias_present, need_dx, need_dweight)
    return (
        dx,
        None,
        dweight.to(weight.dtype) if need_dweight else None,
        dbias.to(weight.dtype) if ctx.bias_present else None,
    )


routed_linear_fwd.register_autograd(_backward, setup_context=_setup)


def routed_linear(
    x: torch.Tensor, modality: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-modality linear projection: y_t = weight[modality_t] @ x_t + bias[modality_t].

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        modality: [...] (x.shape[:-1]) integer ids in [0, M).
        weight: [M, N, K], one nn.Linear weight per modality (cast to x's dtype if it differs).
        bias: optional [M, N].

    Returns:
        [..., N] in x's dtype. When every row has one modality (every decode step) this is one dense GEMM;
        otherwise a grouped GEMM that never multiplies a row by a weight it does not use.
    """
    op = "routed_linear"
    for name, t in (("x", x), ("modality", modality), ("weight", weight)):
        v.check_tensor(op, name, t)
    v.check_float(op, "x", x)
    v.check_float(op, "weight", weight)
    v.check_ids(op, "modality", modality)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., K], got a 0-d tensor")
    v.check_dim(op, "weight", weight, 3, "[M, N, K] (one nn.Linear weight per modality)")
    num_modalities, out_features, in_features = weight.shape
    if in_features != x.shape[-1]:
        raise ValueError(f"{op}: weight must be [M, N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    if num_modalities == 0:
        raise ValueError(f"{op}: weight must have at least one modality, got shape {tuple(weight.shape)}")
    v.check_shape(op, "modality", modality, x.shape[:-1], "x.shape[:-1]: one id per row of x")
    if bias is not None:
        v.check_tensor(op, "bias", bias)
        v.check_float(op, "bias", bias)
        v.check_shape(op, "bias", bias, (num_modalities, out_features), "[M, N]")
    v.check_same_device(op, "x", x, modality=modality, weight=weight, bias=bias)

    out_shape = (*x.shape[:-1], out_features)
    x2 = x.reshape(-1, in_features).contiguous()
    ids = modality.reshape(-1).to(torch.int64).contiguous()
    # Parameters in the activations' dtype (e.g. fp32 weights under bf16 autocast).
    w = weight.to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    return routed_linear_fwd(x2, ids, w, b).view(out_shape)
