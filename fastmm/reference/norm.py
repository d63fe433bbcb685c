"""Reference semantics of the `norm` family: modality-adaptive RMSNorm / LayerNorm (mPLUG-Owl2).

Every row t of x belongs to modality m_t (0 = text, 1 = image, any small number allowed) and uses that
modality's parameters. Math in fp32 (fp64 for fp64 inputs, which the tests use as ground truth), one cast
to x's dtype at the end. With a residual, the sum
s = x + residual is rounded to x's dtype first (what an unfused pipeline would hand the norm), then
normalized; the rounded s is returned as the new residual stream.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32, or fp64 when t is fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else (_acc(x) + _acc(residual)).to(x.dtype)


def modality_rms_norm(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y_t = s_t * rsqrt(mean(s_t^2) + eps) * weight[m_t], with s = x (+ residual).

    x [..., D]; modality [...] integer ids in [0, M); weight [M, D]. Returns y, or (y, s) with residual.
    """
    s = _add_residual(x, residual)
    xf = _acc(s)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (xf * rstd * _acc(weight)[modality.long()]).to(x.dtype)
    return y if residual is None else (y, s)


def modality_layer_norm(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y_t = (s_t - mean(s_t)) * rsqrt(var(s_t) + eps) * weight[m_t] + bias[m_t] (biased variance)."""
    s = _add_residual(x, residual)
    xf = _acc(s)
    mean = xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    index = modality.long()
    y = centered * rstd * _acc(weight)[index]
    if bias is not None:
        y = y + _acc(bias)[index]
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


# ---------------------------------------------------------------------------------------------------------
# Kernel interface: the functions every backend of this family exposes over flattened, contiguous tensors
# (x [T, D], modality [T] int64, statistics [T] fp32). Backward is the closed form below; the tests check it
# against autograd through the spec functions above.
# ---------------------------------------------------------------------------------------------------------


def _statistics(s: torch.Tensor, eps: float, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xf = s.float()
    mean = xf.mean(dim=-1) if centered else xf.new_zeros(xf.shape[0])
    var = (xf - mean[:, None]).pow(2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def rms_norm_fwd(x, modality, weight, residual, eps):
    s = _add_residual(x, residual)
    y = modality_rms_norm(s, modality, weight, eps)
    return y, (s if residual is not None else None), _statistics(s, eps, centered=False)[1]


def layer_norm_fwd(x, modality, weight, bias, residual, eps):
    s = _add_residual(x, residual)
    y = modality_layer_norm(s, modality, weight, bias, eps)
    mean, rstd = _statistics(s, eps, centered=True)
    return y, (s if residual is not None else None), mean, rstd


def _norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight[m]; the mean(g) term only for
    layer norm (mean is None for RMS norm). Returns dx in x's dtype and dweight [M, D] fp32."""
    dyf = dy.float()
    xhat = x_in.float() if mean is None else x_in.float() - mean[:, None]
    xhat = xhat * rstd[:, None]
    g = dyf * weight.float()[modality]
    inner = g - xhat * (g * xhat).mean(dim=-1, keepdim=True)
    if mean is not None:
        inner = inner - g.mean(dim=-1, keepdim=True)
    dx = rstd[:, None] * inner
    if dresidual_out is not None:
        dx = dx + dresidual_out.float()
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=dy.device).index_add_(0, modality, dyf * xhat)
    return dx.to(x_in.dtype), dweight


def rms_norm_bwd(dy, dresidual_out, x_in, modality, weight, rstd):
    return _norm_bwd(dy, dresidual_out, x_in, modality, weight, None, rstd)


def layer_norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd, has_bias):
    dx, dweight = _norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd)
    dbias = None
    if has_bias:
        dbias = torch.zeros(weight.shape, dtype=torch.float32, device=dy.device).index_add_(0, modality, dy.float())
    return dx, dweight, dbias
