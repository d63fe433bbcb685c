"""Native (C++ / CPU) launchers of the `norm` family: modality-adaptive RMSNorm / LayerNorm.

The norms run in fastmm._C (one pass per row, OpenMP over rows). Inputs arrive validated by fastmm.ops: CPU,
contiguous, x's dtype in {float32, float16, bfloat16}, parameters in x's dtype, modality int64 with every id
in [0, M). The kernels' entry points check all of that again, ids included (csrc/norm.cpp), for callers past
fastmm.ops (autograd's backward, torch.compile's graphs).
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import threads_for


def _like_or_none(x: torch.Tensor, present: bool) -> torch.Tensor | None:
    return torch.empty_like(x) if present else None


# ---- norms ----------------------------------------------------------------------------------------------


def rms_norm_fwd(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """s = x (+ residual, rounded to x.dtype); y = s * rsqrt(mean(s^2) + eps) * weight[modality].

    x [T, D]; modality [T] int64; weight [M, D]; residual [T, D] or None.
    Returns y [T, D] x.dtype, residual_out = s [T, D] (None without residual), rstd [T] float32.
    """
    y = torch.empty_like(x)
    residual_out = _like_or_none(x, residual is not None)
    rstd = torch.empty(x.shape[0], dtype=torch.float32)
    _C.rms_norm_fwd(x, modality, weight, residual, y, residual_out, rstd, eps, threads_for(x.numel()))
    return y, residual_out, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    x_in: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = rstd * (g - xhat * mean(g * xhat)) (+ dresidual_out), g = dy * weight[m], xhat = x_in * rstd.

    dy, x_in [T, D] (x_in: the tensor that was normalized, s when a residual was added); dresidual_out
    [T, D] or None; modality [T] int64; weight [M, D]; rstd [T] float32 from rms_norm_fwd.
    Returns dx [T, D] x.dtype and dweight [M, D] float32 (sum of dy * xhat over each modality's rows).
    """
    dx = torch.empty_like(x_in)
    dweight = torch.zeros_like(weight, dtype=torch.float32)
    _C.rms_norm_bwd(dy, dresidual_out, x_in, modality, weight, rstd, dx, dweight, torch.get_num_threads())
    return dx, dweight


def layer_norm_fwd(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """s = x (+ residual); y = (s - mean) * rsqrt(var + eps) * weight[m] (+ bias[m]), biased variance.

    x [T, D]; modality [T] int64; weight, bias [M, D] (bias may be None); residual [T, D] or None.
    Returns y [T, D], residual_out = s or None, mean [T] float32, rstd [T] float32.
    """
    y = torch.empty_like(x)
    residual_out = _like_or_none(x, residual is not None)
    mean = torch.empty(x.shape[0], dtype=torch.float32)
    rstd = torch.empty(x.shape[0], dtype=torch.float32)
    _C.layer_norm_fwd(x, modality, weight, bias, residual, y, residual_out, mean, rstd, eps, torch.get_num_threads())
    return y, residual_out, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    x_in: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out), xhat = (x_in - mean) * rstd.

    Shapes as in rms_norm_bwd, plus mean [T] float32. Returns dx [T, D] x.dtype, dweight [M, D] float32
    and dbias [M, D] float32 (per-modality sum of dy; None unless has_bias).
    """
    dx = torch.empty_like(x_in)
    dweight = torch.zeros_like(weight, dtype=torch.float32)
    dbias = torch.zeros_like(weight, dtype=torch.float32) if has_bias else None
    _C.layer_norm_bwd(
        dy, dresidual_out, x_in, modality, weight, mean, rstd, dx, dweight, dbias, torch.get_num_threads()
    )
    return dx, dweight, dbias
