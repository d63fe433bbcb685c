"""Op family `routed_linear`: routed (per-modality) linear projections, y_t = x_t @ W[m_t]^T + b[m_t].

mPLUG-Owl2 routes the K and V projections of every decoder layer by modality (text = 0, image = 1). Its
reference finds each modality's rows with nonzero (a host sync), gathers, applies that modality's nn.Linear
and scatters back. This op reads each row's modality id inside the kernels instead: a grouped GEMM that
never multiplies a row by a weight it does not use.

The public function validates, flattens to [T, K], and calls the kernels of the chosen backend directly in
eager inference, or the registered custom op ``fastmm::routed_linear`` under torch.compile and when autograd
records (see fastmm.ops._dispatch). Modality ids are range-checked at every eager call: on the host for CPU
tensors, by a device-side assert without a host sync on CUDA (fastmm._validate.check_id_range).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmm import _validate as v
from fastmm.ops._dispatch import kernels, use_dispatcher

_FAMILY = "routed_linear"


@torch.library.custom_op("fastmm::routed_linear", mutates_args=())
def _routed_linear_op(
    x: torch.Tensor, modality: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return kernels(_FAMILY, "routed_linear", x.device).routed_linear_fwd(x, modality, weight, bias)


@_routed_linear_op.register_fake
def _(x, modality, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("fastmm::routed_linear_backward", mutates_args=())
def _routed_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias_present: bool,
    need_dx: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = kernels(_FAMILY, "routed_linear", dy.device).routed_linear_bwd(
        dy, x, modality, weight, bias_present, need_dx, need_dweight
    )
    empty = dy.new_empty(0)
    return (
        empty if dx is None else dx,
        empty.float() if dweight is None else dweight,
        empty.float() if dbias is None else dbias,
    )


@_routed_linear_backward_op.register_fake
def _(dy, x, modality, weight, bias_present, need_dx, need_dweight):
    f32 = torch.float32
    return (
        torch.empty_like(x) if need_dx else dy.new_empty(0),
        weight.new_empty(weight.shape, dtype=f32) if need_dweight else dy.new_empty(0, dtype=f32),
        weight.new_empty(weight.shape[:2], dtype=f32) if bias_present else dy.new_empty(0, dtype=f32),
    )


def _routed_linear_setup(ctx, inputs, output):
    x, modality, weight, bias = inputs
    ctx.bias_present = bias is not None
    ctx.save_for_backward(x, modality, weight)


def _routed_linear_backward(ctx, dy):
    x, modality, weight = ctx.saved_tensors
    need_dx, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, dweight, dbias = _routed_linear_backward_op(
        dy.contiguous(), x, modality, weight, ctx.bias_present, need_dx, need_dweight
    )
    return (
        dx if need_dx else None,
        None,
        dweight.to(weight.dtype) if need_dweight else None,
        dbias.to(weight.dtype) if ctx.bias_present else None,
    )


_routed_linear_op.register_autograd(_routed_linear_backward, setup_context=_routed_linear_setup)


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
    v.check_id_range(op, "modality", modality, num_modalities, "M = weight.shape[0]")

    out_shape = (*x.shape[:-1], out_features)
    x2 = x.reshape(-1, in_features).contiguous()
    ids = modality.reshape(-1).to(torch.int64).contiguous()
    # Parameters in the activations' dtype (e.g. fp32 weights under bf16 autocast).
    w = weight.to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    if use_dispatcher(x, weight, bias):
        y = _routed_linear_op(x2, ids, w, b)
    else:
        y = kernels(_FAMILY, op, x.device).routed_linear_fwd(x2, ids, w, b)
    return y.view(out_shape)
