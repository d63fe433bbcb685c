"""Reference semantics of the `fusion` family: LLaVA-HR's mixture-of-resolution adapter, token-major.

LLaVA-HR feeds a high-resolution conv map x [B, c, hs, ws] (ConvNeXt) into a low-resolution ViT stream
y [B, n, d] (n = gh * gw tokens, row-major over the ViT grid) after some ViT blocks. One adapter is

    S  = resize(Wsp GELU(Wsc x + bsc) + bsp)          1x1 convs c -> c -> d, resized to the ViT grid
    F  = y + Wfp GELU(DWConv_kxk(y) + bdw) + bfp      depthwise conv (k = 7, zero padding) on the ViT grid
    g  = W2 GELU(W1 [mean_t F ; mean_t S] + b1) + b2  one scalar gate per image
    y' = F + tanh(g) S

GELU is the exact (erf) one. resize is the identity when the grids are equal, bilinear upsampling with
align_corners=True when the conv grid is smaller, and average pooling by an integer factor when it is larger:
the three cases LLaVA-HR handles. Math in fp32 (fp64 for fp64 inputs, which the tests use as ground truth),
one cast at the end. Weights are in nn.Linear layout: Wsc [c, c], Wsp [d, c], Wfp [d, d], the depthwise
kernel [d, k, k]; A adapters' slow-branch weights are stacked on a leading axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32, or fp64 when t is fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def resize_kind(source: tuple[int, int], grid: tuple[int, int]) -> str:
    """How a conv grid ``source`` (h, w) reaches the ViT grid: "identity", "upsample" or "pool"; "" when it
    cannot (neither smaller in both sides nor the same integer multiple of both)."""
    (hs, ws), (gh, gw) = source, grid
    if (hs, ws) == (gh, gw):
        return "identity"
    if hs <= gh and ws <= gw:
        return "upsample"
    if hs >= gh and ws >= gw and hs % gh == 0 and ws % gw == 0 and hs // gh == ws // gw:
        return "pool"
    return ""


def resize_to_grid(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """t [B, C, h, w] resized to grid (gh, gw), as LLaVA-HR does (bilinear align_corners=True up, average
    pooling down, identity when equal)."""
    kind = resize_kind(tuple(t.shape[-2:]), grid)
    if kind == "identity":
        return t
    if kind == "upsample":
        return F.interpolate(t, size=grid, mode="bilinear", align_corners=True)
    if kind == "pool":
        factor = t.shape[-2] // grid[0]
        return F.avg_pool2d(t, factor, factor)
    raise ValueError(f"no resize from a {tuple(t.shape[-2:])} grid to {grid}")


def slow_branch(x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b, grid):
    """S for one adapter: x [B, c, hs, ws]; slow_conv_w [c, c]; slow_conv_b [c]; slow_proj_w [d, c];
    slow_proj_b [d]; grid (gh, gw). Returns [B, gh * gw, d] token-major in the accumulation dtype."""
    xf = _acc(x)
    hidden = F.gelu(torch.einsum("oc,bchw->bohw", _acc(slow_conv_w), xf) + _acc(slow_conv_b)[:, None, None])
    s = torch.einsum("oc,bchw->bohw", _acc(slow_proj_w), hidden) + _acc(slow_proj_b)[:, None, None]
    return resize_to_grid(s, grid).flatten(2).transpose(1, 2)


def resolution_slow_branch(x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b, grid):
    """Every adapter's S: weights stacked over A adapters ([A, c, c], [A, c], [A, d, c], [A, d]).
    Returns [A, B, gh * gw, d] in x's dtype."""
    branches = [
        slow_branch(x, slow_conv_w[a], slow_conv_b[a], slow_proj_w[a], slow_proj_b[a], grid)
        for a in range(slow_conv_w.shape[0])
    ]
    return torch.stack(branches).to(x.dtype)


def resolution_fusion(y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2, grid):
    """y' = F + tanh(g) S for y [B, n, d], s [B, n, d], dw_w [d, k, k], dw_b [d], fast_proj_w [d, d],
    fast_proj_b [d], gate_w1 [d_g, 2d], gate_b1 [d_g], gate_w2 [1, d_g], gate_b2 [1]; grid (gh, gw) with
    gh * gw = n. Returns [B, n, d] in y's dtype."""
    B, n, d = y.shape
    yf, sf = _acc(y), _acc(s)
    image = yf.transpose(1, 2).reshape(B, d, *grid)
    k = dw_w.shape[-1]
    conv = F.conv2d(image, _acc(dw_w)[:, None], _acc(dw_b), padding=k // 2, groups=d)
    fast = F.gelu(conv).flatten(2).transpose(1, 2)
    fused = yf + fast @ _acc(fast_proj_w).t() + _acc(fast_proj_b)
    pooled = torch.cat([fused.mean(1), sf.mean(1)], dim=-1)
    gate = F.gelu(pooled @ _acc(gate_w1).t() + _acc(gate_b1)) @ _acc(gate_w2).t() + _acc(gate_b2)
    return (fused + torch.tanh(gate)[:, None, :] * sf).to(y.dtype)


# ---------------------------------------------------------------------------------------------------------
# Kernel interface: the functions every backend of this family exposes, over contiguous tensors (x may also be
# channels-last) with the grid as two ints. The backward kernels are the closed forms below (no backend has its
# own); the tests hold them to autograd through a LLaVA-HR-style module. They use no autograd themselves: a
# custom op's kernels run below the autograd dispatch key.
# ---------------------------------------------------------------------------------------------------------


def resolution_slow_branch_fwd(x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b, grid_h, grid_w):
    return resolution_slow_branch(x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b, (grid_h, grid_w))


def resolution_fusion_fwd(
    y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2, grid_h, grid_w
):
    return resolution_fusion(
        y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2, (grid_h, grid_w)
    )


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d GELU(x) / dx = Phi(x) + x phi(x) (the exact GELU)."""
    cdf = 0.5 * (1.0 + torch.erf(x * 0.5**0.5))
    pdf = torch.exp(-0.5 * x * x) * (2.0 * torch.pi) ** -0.5
    return cdf + x * pdf


def _resize_adjoint(grad: torch.Tensor, source: tuple[int, int]) -> torch.Tensor:
    """The transpose of resize_to_grid: grad [B, C, gh, gw] on the ViT grid -> [B, C, hs, ws] on the conv grid."""
    grid = tuple(grad.shape[-2:])
    kind = resize_kind(source, grid)
    if kind == "identity":
        return grad
    shape = [*grad.shape[:2], *source]
    if kind == "upsample":
        return torch.ops.aten.upsample_bilinear2d_backward(grad, grid, shape, True)
    factor = source[0] // grid[0]
    return grad.repeat_interleave(factor, -2).repeat_interleave(factor, -1) / (factor * factor)


def resolution_slow_branch_bwd(grad, x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b, grid_h, grid_w):
    """Gradients (dx, dslow_conv_w, dslow_conv_b, dslow_proj_w, dslow_proj_b) of resolution_slow_branch_fwd,
    grad [A, B, gh * gw, d]; each in its input's dtype."""
    xf = _acc(x)
    B, c, hs, ws = x.shape
    dx = torch.zeros_like(xf)
    parts = []
    for a in range(slow_conv_w.shape[0]):
        w1, w2 = _acc(slow_conv_w[a]), _acc(slow_proj_w[a])
        pre = torch.einsum("oc,bchw->bohw", w1, xf) + _acc(slow_conv_b[a])[:, None, None]
        hidden = F.gelu(pre)
        dproj = _acc(grad[a]).transpose(1, 2).reshape(B, -1, grid_h, grid_w)
        dproj = _resize_adjoint(dproj, (hs, ws))  # [B, d, hs, ws]
        dhidden = torch.einsum("dc,bdhw->bchw", w2, dproj)
        dpre = dhidden * _gelu_grad(pre)
        dx += torch.einsum("oc,bohw->bchw", w1, dpre)
        parts.append((torch.einsum("bohw,bchw->oc", dpre, xf), dpre.sum((0, 2, 3)),
                      torch.einsum("bdhw,bchw->dc", dproj, hidden), dproj.sum((0, 2, 3))))  # fmt: skip
    stacked = [torch.stack(p) for p in zip(*parts)]
    inputs = (x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b)
    return tuple(g.to(t.dtype) for g, t in zip((dx, *stacked), inputs))


def resolution_fusion_bwd(
    grad, y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2, grid_h, grid_w
):
    """Gradients of resolution_fusion_fwd with respect to its ten tensor arguments, in their order, each in its
    input's dtype."""
    B, n, d = y.shape
    yf, sf, dout = _acc(y), _acc(s), _acc(grad)
    w_dw, w_fp, w1, w2 = _acc(dw_w), _acc(fast_proj_w), _acc(gate_w1), _acc(gate_w2)
    k = dw_w.shape[-1]
    # forward again, keeping what the backward reads
    image = yf.transpose(1, 2).reshape(B, d, grid_h, grid_w)
    conv = F.conv2d(image, w_dw[:, None], _acc(dw_b), padding=k // 2, groups=d)
    fast = F.gelu(conv).flatten(2).transpose(1, 2)  # [B, n, d]
    fused = yf + fast @ w_fp.t() + _acc(fast_proj_b)
    pooled = torch.cat([fused.mean(1), sf.mean(1)], dim=-1)  # [B, 2d]
    pre_gate = pooled @ w1.t() + _acc(gate_b1)
    hidden_gate = F.gelu(pre_gate)
    tanh_gate = torch.tanh(hidden_gate @ w2.t() + _acc(gate_b2))  # [B, 1]
    # out = fused + tanh_gate * s
    dgate = (dout * sf).sum((1, 2))[:, None] * (1 - tanh_gate * tanh_gate)  # [B, 1]
    dw2, db2 = dgate.t() @ hidden_gate, dgate.sum(0)
    dpre_gate = (dgate @ w2) * _gelu_grad(pre_gate)
    dw1, db1 = dpre_gate.t() @ pooled, dpre_gate.sum(0)
    dpooled = dpre_gate @ w1
    dfused = dout + dpooled[:, None, :d] / n
    ds = tanh_gate[:, :, None] * dout + dpooled[:, None, d:] / n
    dfast = dfused @ w_fp
    dw_fp, db_fp = dfused.flatten(0, 1).t() @ fast.flatten(0, 1), dfused.sum((0, 1))
    dconv = (dfast * _gelu_grad(conv.flatten(2).transpose(1, 2))).transpose(1, 2).reshape(B, d, grid_h, grid_w)
    grouped = dict(stride=1, padding=k // 2, groups=d)
    dimage = torch.nn.grad.conv2d_input(image.shape, w_dw[:, None], dconv, **grouped)
    ddw = torch.nn.grad.conv2d_weight(image, (d, 1, k, k), dconv, **grouped)[:, 0]
    dy = dfused + dimage.flatten(2).transpose(1, 2)
    grads = (dy, ds, ddw, dconv.sum((0, 2, 3)), dw_fp, db_fp, dw1, db1, dw2, db2)
    inputs = (y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))
