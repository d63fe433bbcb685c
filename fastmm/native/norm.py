"""Native (C++ / CPU) launchers of the `norm` family: modality-adaptive RMSNorm / LayerNorm.

The norms run in fastmm._C (one pass per row, OpenMP over rows). Inputs arrive validated by fastmm.ops: CPU,
contiguous, x's dtype in {float32, float16, bfloat16}, parameters in x's dtype, modality int64 with every id
in [0, M).
"""

from __future__ import annotations

import torch

from fastmm import _C
from fastmm.native._shared import DTYPE_CODE, check_contiguous, ptr, threads_for


def _like_or_none(x: torch.Tensor, present: bool) -> torch.Tensor | None:
    return torch.empty_like(x) if present else None


def _check_modality(modality: torch.Tensor, num_modalities: int) -> None:
    """Every id in [0, M): the kernels index weight rows with them. fastmm.ops checks this too, but not while
    torch.compile traces (values are unknown there), and the compiled graph then calls these launchers."""
    if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= num_modalities):
        raise ValueError(
            f"native norm kernel: modality ids must be in [0, {num_modalities}), got values in "
            f"[{int(modality.min())}, {int(modality.max())}]"
        )


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
    T, D = x.shape
    M = weight.shape[0]
    check_contiguous("norm", x=(x, (T, D), x.dtype), modality=(modality, (T,), torch.int64),
                     weight=(weight, (M, D), x.dtype), residual=(residual, (T, D), x.dtype))  # fmt: skip
    _check_modality(modality, M)
    y = torch.empty_like(x)
    residual_out = _like_or_none(x, residual is not None)
    rstd = torch.empty(T, dtype=torch.float32)
    if T:
        _C.rms_norm_fwd(
            x.data_ptr(), modality.data_ptr(), weight.data_ptr(), ptr(residual), y.data_ptr(),
            ptr(residual_out), rstd.data_ptr(), T, D, eps, DTYPE_CODE[x.dtype], threads_for(T * D),
        )  # fmt: skip
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
    T, D = x_in.shape
    M = weight.shape[0]
    check_contiguous("norm", dy=(dy, (T, D), x_in.dtype), dresidual_out=(dresidual_out, (T, D), x_in.dtype),
                     x_in=(x_in, (T, D), x_in.dtype), modality=(modality, (T,), torch.int64),
                     weight=(weight, (M, D), x_in.dtype), rstd=(rstd, (T,), torch.float32))  # fmt: skip
    _check_modality(modality, M)
    dx = torch.empty_like(x_in)
    dweight = torch.zeros(M, D, dtype=torch.float32)
    if T:
        _C.rms_norm_bwd(
            dy.data_ptr(), ptr(dresidual_out), x_in.data_ptr(), modality.data_ptr(), weight.data_ptr(),
            rstd.data_ptr(), dx.data_ptr(), dweight.data_ptr(), T, D, M, DTYPE_CODE[x_in.dtype],
            torch.get_num_threads(),
        )  # fmt: skip
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
    T, D = x.shape
    M = weight.shape[0]
    check_contiguous("norm", x=(x, (T, D), x.dtype), modality=(modality, (T,), torch.int64),
                     weight=(weight, (M, D), x.dtype), bias=(bias, (M, D), x.dtype),
                     residual=(residual, (T, D), x.dtype))  # fmt: skip
    _check_modality(modality, M)
    y = torch.empty_like(x)
    residual_out = _like_or_none(x, residual is not None)
    mean = torch.empty(T, dtype=torch.float32)
    rstd = torch.empty(T, dtype=torch.float32)
    if T:
        _C.layer_norm_fwd(
            x.data_ptr(), modality.data_ptr(), weight.data_ptr(), ptr(bias), ptr(residual), y.data_ptr(),
            ptr(residual_out), mean.data_ptr(), rstd.data_ptr(), T, D, eps, DTYPE_CODE[x.dtype],
            torch.get_num_threads(),
        )  # fmt: skip
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
    T, D = x_in.shape
    M = weight.shape[0]
    check_contiguous("norm", dy=(dy, (T, D), x_in.dtype), dresidual_out=(dresidual_out, (T, D), x_in.dtype),
                     x_in=(x_in, (T, D), x_in.dtype), modality=(modality, (T,), torch.int64),
                     weight=(weight, (M, D), x_in.dtype), mean=(mean, (T,), torch.float32),
                     rstd=(rstd, (T,), torch.float32))  # fmt: skip
    _check_modality(modality, M)
    dx = torch.empty_like(x_in)
    dweight = torch.zeros(M, D, dtype=torch.float32)
    dbias = torch.zeros(M, D, dtype=torch.float32) if has_bias else None
    if T:
        _C.layer_norm_bwd(
            dy.data_ptr(), ptr(dresidual_out), x_in.data_ptr(), modality.data_ptr(), weight.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dweight.data_ptr(), ptr(dbias), T, D, M,
            DTYPE_CODE[x_in.dtype], torch.get_num_threads(),
        )  # fmt: skip
    return dx, dweight, dbias
