"""Op family `norm`: modality-adaptive RMSNorm / LayerNorm.

mPLUG-Owl2 gives every decoder layer one norm per modality (text = 0, image = 1). Its reference finds each
modality's rows with nonzero (a host sync), gathers, applies the module and scatters back. These ops read
each row's modality id inside one kernel instead.

Each public function validates and flattens to [T, D]; the kernels declared below (fastmm.ops._spec) run the
chosen backend, through the custom op ``fastmm::<name>`` under torch.compile and when autograd records.
Modality ids are range-checked at every call: on the host for CPU tensors, by a device-side assert without a
host sync on CUDA (fastmm._validate.check_id_range).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmm import _validate as v
from fastmm.ops._spec import ids_below, kernel_op

Tensor = torch.Tensor
_MODALITY_IN_RANGE = (ids_below("modality", "weight", label="M"),)


# --------------------------------------------------------------------------------------------- validation


def _check_norm_inputs(op, x, modality, weight, bias, residual, eps):
    v.check_tensor(op, "x", x)
    v.check_tensor(op, "modality", modality)
    v.check_tensor(op, "weight", weight)
    v.check_float(op, "x", x)
    v.check_float(op, "weight", weight)
    v.check_ids(op, "modality", modality)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., D], got a 0-d tensor")
    hidden = x.shape[-1]
    v.check_dim(op, "weight", weight, 2, "[M, D] (one row per modality)")
    if weight.shape[1] != hidden:
        raise ValueError(f"{op}: weight must be [M, D] with D = x.shape[-1] = {hidden}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have at least one modality row, got shape {tuple(weight.shape)}")
    v.check_shape(op, "modality", modality, x.shape[:-1], "x.shape[:-1]: one id per row of x")
    if bias is not None:
        v.check_tensor(op, "bias", bias)
        v.check_float(op, "bias", bias)
        v.check_shape(op, "bias", bias, weight.shape, "[M, D] like weight")
    if residual is not None:
        v.check_tensor(op, "residual", residual)
        v.check_shape(op, "residual", residual, x.shape, "the shape of x")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    v.check_same_device(op, "x", x, modality=modality, weight=weight, bias=bias, residual=residual)
    v.check_eps(op, eps)


def _flat_rows(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, width).contiguous()


def _flat_ids(modality: torch.Tensor) -> torch.Tensor:
    return modality.reshape(-1).to(torch.int64).contiguous()


def _param(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Parameters in the activations' dtype (e.g. fp32 weights under bf16 autocast): a tiny [M, D] copy."""
    return None if p is None else p.to(dtype).contiguous()


def _present_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of an optional output as the kernels take it: None when absent, else contiguous (autograd
    may hand over an expanded or strided tensor, and the kernels index rows by a single stride)."""
    return None if grad is None or grad.numel() == 0 else grad.contiguous()


# --------------------------------------------------------------------------------------- modality_rms_norm


@kernel_op("norm", "modality_rms_norm", checks=_MODALITY_IN_RANGE)
def rms_norm_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    residual_out = torch.empty_like(x) if residual is not None else None
    return torch.empty_like(x), residual_out, x.new_empty(x.shape[0], dtype=torch.float32)


@kernel_op("norm", "modality_rms_norm", name="modality_rms_norm_backward")
def rms_norm_bwd(
    dy: Tensor, dresidual_out: Optional[Tensor], x_in: Tensor, modality: Tensor, weight: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x_in), weight.new_empty(weight.shape, dtype=torch.float32)


def _rms_norm_setup(ctx, inputs, output):
    x, modality, weight, residual, _ = inputs
    _, residual_out, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, modality, weight, rstd)


def _rms_norm_backward(ctx, dy, dresidual_out, _drstd):
    x_in, modality, weight, rstd = ctx.saved_tensors
    dres = _present_grad(dresidual_out) if ctx.has_residual else None
    dx, dweight = rms_norm_bwd(dy.contiguous(), dres, x_in, modality, weight, rstd)
    return dx, None, dweight.to(weight.dtype), (dx if ctx.has_residual else None), None


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def modality_rms_norm(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with one weight row per modality: y_t = s_t * rsqrt(mean(s_t^2) + eps) * weight[modality_t].

    Args:
        x: [..., D] float32 / float16 / bfloat16 activations.
        modality: [...] (x.shape[:-1]) integer ids in [0, M): 0 = text, 1 = image in mPLUG-Owl2.
        weight: [M, D] per-modality scales (cast to x's dtype if it differs).
        eps: added to the mean square, as in LlamaRMSNorm.
        residual: optional [..., D] in x's dtype. Then s = x + residual (rounded to x's dtype) is normalized
            and (y, s) is returned, so the caller keeps the new residual stream (fused add + norm).

    Returns:
        y [..., D] in x's dtype, or (y, s) when a residual is given. Statistics are fp32.
    """
    op = "modality_rms_norm"
    _check_norm_inputs(op, x, modality, weight, None, residual, eps)
    shape, hidden = x.shape, x.shape[-1]
    x2, r2 = _flat_rows(x, hidden), _flat_rows(residual, hidden)
    y, residual_out, _ = rms_norm_fwd(x2, _flat_ids(modality), _param(weight, x.dtype), r2, float(eps))
    y = y.view(shape)
    return y if residual is None else (y, residual_out.view(shape))


# ------------------------------------------------------------------------------------- modality_layer_norm


@kernel_op("norm", "modality_layer_norm", checks=_MODALITY_IN_RANGE)
def layer_norm_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    residual_out = torch.empty_like(x) if residual is not None else None
    stat = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), residual_out, stat, torch.empty_like(stat)


@kernel_op("norm", "modality_layer_norm", name="modality_layer_norm_backward")
def layer_norm_bwd(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    x_in: Tensor,
    modality: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    dweight = weight.new_empty(weight.shape, dtype=torch.float32)
    return torch.empty_like(x_in), dweight, (torch.empty_like(dweight) if has_bias else None)


def _layer_norm_setup(ctx, inputs, output):
    x, modality, weight, bias, residual, _ = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, modality, weight, mean, rstd)


def _layer_norm_backward(ctx, dy, dresidual_out, _dmean, _drstd):
    x_in, modality, weight, mean, rstd = ctx.saved_tensors
    dres = _present_grad(dresidual_out) if ctx.has_residual else None
    dx, dweight, dbias = layer_norm_bwd(dy.contiguous(), dres, x_in, modality, weight, mean, rstd, ctx.has_bias)
    dbias = dbias.to(weight.dtype) if ctx.has_bias else None
    return dx, None, dweight.to(weight.dtype), dbias, (dx if ctx.has_residual else None), None


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def modality_layer_norm(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm with one (weight, bias) row per modality:
    y_t = (s_t - mean(s_t)) * rsqrt(var(s_t) + eps) * weight[modality_t] + bias[modality_t].

    Args as modality_rms_norm, plus bias: optional [M, D]. Variance is biased (as torch.nn.LayerNorm).
    Returns y [..., D], or (y, s) when a residual is given.
    """
    op = "modality_layer_norm"
    _check_norm_inputs(op, x, modality, weight, bias, residual, eps)
    shape, hidden = x.shape, x.shape[-1]
    x2, r2 = _flat_rows(x, hidden), _flat_rows(residual, hidden)
    ids, w, b = _flat_ids(modality), _param(weight, x.dtype), _param(bias, x.dtype)
    y, residual_out, _, _ = layer_norm_fwd(x2, ids, w, b, r2, float(eps))
    y = y.view(shape)
    return y if residual is None else (y, residual_out.view(shape))
