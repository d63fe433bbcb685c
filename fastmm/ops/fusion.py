"""Op family `fusion`: LLaVA-HR's mixture-of-resolution adapter (a high-resolution conv map fused into a
low-resolution ViT stream), token-major.

LLaVA-HR's adapter runs in NCHW: it transposes the ViT stream to a feature map and back, runs its 1x1
projections as convolutions and GELU as separate passes, and each of its three adapters recomputes its slow
branch from the same final conv map. Here the slow branches of all adapters are one op over that map
(``resolution_slow_branch``: all slow_conv GEMMs in one, then per adapter one projection GEMM writing
token-major), and the per-block fusion is one op over the token-major stream (``resolution_fusion``: the
depthwise convolution + GELU in one kernel that also reduces the token means the gate needs, one GEMM, one
blend). The semantics are fastmm.reference.fusion's.

Both ops are trainable (LLaVA-HR trains its adapters); their backward recomputes the reference under autograd
(no backend has its own yet), correct rather than fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastmm import _validate as v
from fastmm.ops._spec import kernel_op
from fastmm.reference.fusion import resize_kind

Tensor = torch.Tensor

MAX_KERNEL_SIZE = 15  # the native and triton depthwise kernels keep k*k taps per channel in registers / cache


@kernel_op("fusion", "resolution_slow_branch")
def resolution_slow_branch_fwd(
    x: Tensor, slow_conv_w: Tensor, slow_conv_b: Tensor, slow_proj_w: Tensor, slow_proj_b: Tensor, grid_h: int, grid_w: int
) -> Tensor:
    return x.new_empty(slow_proj_w.shape[0], x.shape[0], grid_h * grid_w, slow_proj_w.shape[1])


@kernel_op("fusion", "resolution_slow_branch", name="resolution_slow_branch_backward", optional=True)
def resolution_slow_branch_bwd(
    grad: Tensor,
    x: Tensor,
    slow_conv_w: Tensor,
    slow_conv_b: Tensor,
    slow_proj_w: Tensor,
    slow_proj_b: Tensor,
    grid_h: int,
    grid_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) for t in (x, slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b))


@kernel_op("fusion", "resolution_fusion")
def resolution_fusion_fwd(
    y: Tensor,
    s: Tensor,
    dw_w: Tensor,
    dw_b: Tensor,
    fast_proj_w: Tensor,
    fast_proj_b: Tensor,
    gate_w1: Tensor,
    gate_b1: Tensor,
    gate_w2: Tensor,
    gate_b2: Tensor,
    grid_h: int,
    grid_w: int,
) -> Tensor:
    return torch.empty_like(y)


@kernel_op("fusion", "resolution_fusion", name="resolution_fusion_backward", optional=True)
def resolution_fusion_bwd(
    grad: Tensor,
    y: Tensor,
    s: Tensor,
    dw_w: Tensor,
    dw_b: Tensor,
    fast_proj_w: Tensor,
    fast_proj_b: Tensor,
    gate_w1: Tensor,
    gate_b1: Tensor,
    gate_w2: Tensor,
    gate_b2: Tensor,
    grid_h: int,
    grid_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    tensors = (y, s, dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2)
    return tuple(torch.empty_like(t) for t in tensors)


def _setup_saving_inputs(ctx, inputs, output):
    ctx.grid = inputs[-2:]
    ctx.save_for_backward(*inputs[:-2])


def _slow_branch_backward(ctx, grad):
    return (*resolution_slow_branch_bwd(grad.contiguous(), *ctx.saved_tensors, *ctx.grid), None, None)


def _fusion_backward(ctx, grad):
    return (*resolution_fusion_bwd(grad.contiguous(), *ctx.saved_tensors, *ctx.grid), None, None)


resolution_slow_branch_fwd.register_autograd(_slow_branch_backward, setup_context=_setup_saving_inputs)
resolution_fusion_fwd.register_autograd(_fusion_backward, setup_context=_setup_saving_inputs)


# ------------------------------------------------------------------------------------------------ validation


def square_grid(tokens: int, op: str = "fusion") -> tuple[int, int]:
    """The square ViT grid (side, side) of ``tokens`` tokens (LLaVA-HR's only kind); an error naming ``op`` when
    tokens is not a square."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{op}: y has {tokens} tokens, not a square grid: pass grid=(h, w) with h * w = {tokens}")
    return side, side


def _grid(op: str, grid: object, tokens: int | None) -> tuple[int, int]:
    """grid as (h, w): an int n means (n, n); None means the square grid of ``tokens``."""
    if grid is None:
        return square_grid(tokens, op)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"{op}: grid must be a positive int or a pair (h, w) of positive ints, got {grid!r}")
    if tokens is not None and grid[0] * grid[1] != tokens:
        raise ValueError(f"{op}: grid {tuple(grid)} has {grid[0] * grid[1]} tokens but y has {tokens}")
    return int(grid[0]), int(grid[1])


def _floats(op: str, anchor_name: str, anchor: Tensor, **tensors: Tensor) -> None:
    """Every tensor is a float tensor on the anchor's device."""
    for name, t in tensors.items():
        v.check_tensor(op, name, t)
        v.check_float(op, name, t)
    v.check_same_device(op, anchor_name, anchor, **tensors)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A parameter in the activations' dtype (e.g. fp32 weights under bf16 autocast), contiguous."""
    return t.to(dtype).contiguous()


def resolution_slow_branch(
    x: Tensor, slow_conv_w: Tensor, slow_conv_b: Tensor, slow_proj_w: Tensor, slow_proj_b: Tensor, grid
) -> Tensor:
    """The slow branch of A adapters at once: S_a = resize(Wsp_a GELU(Wsc_a x + bsc_a) + bsp_a), token-major.

    Args:
        x: the conv map [B, c, hs, ws], float32 / float16 / bfloat16, read in place when contiguous or
            channels-last.
        slow_conv_w: [A, c, c], the adapters' slow_conv weights (a 1x1 Conv2d's [c, c, 1, 1] squeezed).
        slow_conv_b: [A, c].
        slow_proj_w: [A, d, c].
        slow_proj_b: [A, d].
        grid: the ViT grid (gh, gw), or an int for a square one. The conv grid must equal it, be smaller in
            both sides (bilinear upsampling, align_corners=True) or be the same integer multiple of both
            (average pooling).

    Returns:
        S [A, B, gh * gw, d] in x's dtype; S[a] is what adapter a blends into the ViT stream.
    """
    op = "resolution_slow_branch"
    v.check_tensor(op, "x", x)
    v.check_float(op, "x", x)
    v.check_dim(op, "x", x, 4, "[B, c, hs, ws] (a conv feature map)")
    _floats(op, "x", x, slow_conv_w=slow_conv_w, slow_conv_b=slow_conv_b,
            slow_proj_w=slow_proj_w, slow_proj_b=slow_proj_b)  # fmt: skip
    B, c, hs, ws = x.shape
    v.check_dim(op, "slow_conv_w", slow_conv_w, 3, "[A, c, c] (one adapter's weight per row)")
    adapters = slow_conv_w.shape[0]
    v.check_shape(op, "slow_conv_w", slow_conv_w, (adapters, c, c), f"[A, c, c] with c = x.shape[1] = {c}")
    v.check_shape(op, "slow_conv_b", slow_conv_b, (adapters, c), "[A, c]")
    v.check_dim(op, "slow_proj_w", slow_proj_w, 3, "[A, d, c]")
    d = slow_proj_w.shape[1]
    v.check_shape(op, "slow_proj_w", slow_proj_w, (adapters, d, c), f"[A, d, c] with A = {adapters}, c = {c}")
    v.check_shape(op, "slow_proj_b", slow_proj_b, (adapters, d), "[A, d]")
    if min(adapters, B, c, hs, ws, d) == 0:
        raise ValueError(f"{op}: empty input: x {tuple(x.shape)}, slow_proj_w {tuple(slow_proj_w.shape)}")
    grid_h, grid_w = _grid(op, grid, None)
    if not resize_kind((hs, ws), (grid_h, grid_w)):
        raise ValueError(
            f"{op}: x's grid {(hs, ws)} cannot reach grid {(grid_h, grid_w)}: it must be equal, smaller in both "
            f"sides, or the same integer multiple of both"
        )
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    weights = (_as(w, x.dtype) for w in (slow_conv_w, slow_conv_b, slow_proj_w, slow_proj_b))
    return resolution_slow_branch_fwd(x, *weights, grid_h, grid_w)


def resolution_fusion(
    y: Tensor,
    s: Tensor,
    dw_w: Tensor,
    dw_b: Tensor,
    fast_proj_w: Tensor,
    fast_proj_b: Tensor,
    gate_w1: Tensor,
    gate_b1: Tensor,
    gate_w2: Tensor,
    gate_b2: Tensor,
    grid=None,
) -> Tensor:
    """One adapter's fusion of its slow branch s into the ViT stream y: F + tanh(g) s, with
    F = y + fast_proj(GELU(depthwise_kxk(y) + dw_b)) and g = gate MLP over the token means of [F ; s].

    Args:
        y: [B, n, d] the ViT stream, token-major (token t = row * gw + col), float32 / float16 / bfloat16.
        s: [B, n, d] this adapter's slow branch (resolution_slow_branch(...)[a]).
        dw_w: [d, k, k] (or a depthwise Conv2d's [d, 1, k, k]), k odd, at most 15; dw_b: [d].
        fast_proj_w: [d, d] (or a 1x1 Conv2d's [d, d, 1, 1]); fast_proj_b: [d].
        gate_w1: [d_g, 2d]; gate_b1: [d_g]; gate_w2: [1, d_g]; gate_b2: [1] (LLaVA-HR: d_g = d / 2).
        grid: the ViT grid (gh, gw) with gh * gw = n, or an int; None for the square grid of n.

    Returns:
        [B, n, d] in y's dtype.
    """
    op = "resolution_fusion"
    v.check_tensor(op, "y", y)
    v.check_float(op, "y", y)
    v.check_dim(op, "y", y, 3, "[B, n, d] (the ViT stream, token-major)")
    B, n, d = y.shape
    params = dict(dw_w=dw_w, dw_b=dw_b, fast_proj_w=fast_proj_w, fast_proj_b=fast_proj_b,
                  gate_w1=gate_w1, gate_b1=gate_b1, gate_w2=gate_w2, gate_b2=gate_b2)  # fmt: skip
    _floats(op, "y", y, s=s, **params)
    v.check_shape(op, "s", s, (B, n, d), "y's shape [B, n, d]")
    if dw_w.dim() == 4 and dw_w.shape[1] == 1:
        dw_w = dw_w[:, 0]
    v.check_dim(op, "dw_w", dw_w, 3, "[d, k, k] (a depthwise Conv2d weight)")
    k = dw_w.shape[-1]
    if k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: dw_w must have an odd kernel size k <= {MAX_KERNEL_SIZE}, got {tuple(dw_w.shape)}")
    v.check_shape(op, "dw_w", dw_w, (d, k, k), f"[d, k, k] with d = y.shape[-1] = {d}")
    v.check_shape(op, "dw_b", dw_b, (d,), "[d]")
    if fast_proj_w.dim() == 4 and fast_proj_w.shape[2:] == (1, 1):
        fast_proj_w = fast_proj_w[:, :, 0, 0]
    v.check_shape(op, "fast_proj_w", fast_proj_w, (d, d), f"[d, d] with d = {d}")
    v.check_shape(op, "fast_proj_b", fast_proj_b, (d,), "[d]")
    v.check_dim(op, "gate_w1", gate_w1, 2, "[d_g, 2d]")
    width = gate_w1.shape[0]
    v.check_shape(op, "gate_w1", gate_w1, (width, 2 * d), f"[d_g, 2d] with d = {d}")
    v.check_shape(op, "gate_b1", gate_b1, (width,), f"[d_g] with d_g = gate_w1.shape[0] = {width}")
    v.check_shape(op, "gate_w2", gate_w2, (1, width), f"[1, d_g] with d_g = {width}")
    v.check_shape(op, "gate_b2", gate_b2, (1,), "[1]")
    if min(B, n, d, width) == 0:
        raise ValueError(f"{op}: empty input: y {tuple(y.shape)}, gate_w1 {tuple(gate_w1.shape)}")
    grid_h, grid_w = _grid(op, grid, n)
    weights = (_as(w, y.dtype) for w in (dw_w, dw_b, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2))
    return resolution_fusion_fwd(y.contiguous(), s.contiguous(), *weights, grid_h, grid_w)


def conv_map_tokens(x: Tensor, grid) -> Tensor:
    """The conv map x [B, c, hs, ws] resized to the ViT grid as LLaVA-HR's final align does (bilinear
    align_corners=True up, computed in fp32; average pooling down), token-major [B, gh * gw, c]: a view of x
    when it is channels-last on the ViT grid already."""
    op = "conv_map_tokens"
    v.check_tensor(op, "x", x)
    v.check_float(op, "x", x)
    v.check_dim(op, "x", x, 4, "[B, c, hs, ws] (a conv feature map)")
    grid = _grid(op, grid, None)
    kind = resize_kind(tuple(x.shape[-2:]), grid)
    if not kind:
        raise ValueError(f"{op}: x's grid {tuple(x.shape[-2:])} cannot reach grid {grid}: it must be equal, "
                         "smaller in both sides, or the same integer multiple of both")  # fmt: skip
    if kind == "upsample":
        x = F.interpolate(x.float(), size=grid, mode="bilinear", align_corners=True).to(x.dtype)
    elif kind == "pool":
        x = F.avg_pool2d(x, x.shape[-2] // grid[0])
    return x.flatten(2).transpose(1, 2)


def folded_align(y: Tensor, x: Tensor, weight_y: Tensor, weight_x: Tensor, bias: Tensor, grid) -> Tensor:
    """A Linear after LLaVA-HR's final align, folded (ResolutionAlign.folded_into): y W_y^T + x_tok W_x^T + b with
    x_tok = conv_map_tokens(x, grid). Two GEMMs, the second accumulating into the first's output, so the
    concatenation [y | x_tok] is never built.

    Args:
        y: [B, n, d]; x: [B, c, hs, ws]; weight_y: [D, d]; weight_x: [D, c]; bias: [D]; grid as conv_map_tokens.
    Returns:
        [B, n, D] in y's dtype.
    """
    op = "folded_align"
    v.check_tensor(op, "y", y)
    v.check_float(op, "y", y)
    v.check_dim(op, "y", y, 3, "[B, n, d] (the ViT stream, token-major)")
    B, n, d = y.shape
    _floats(op, "y", y, x=x, weight_y=weight_y, weight_x=weight_x, bias=bias)
    v.check_dim(op, "weight_y", weight_y, 2, "[D, d]")
    out_features = weight_y.shape[0]
    v.check_shape(op, "weight_y", weight_y, (out_features, d), f"[D, d] with d = y.shape[-1] = {d}")
    v.check_dim(op, "x", x, 4, "[B, c, hs, ws] (a conv feature map)")
    v.check_shape(op, "weight_x", weight_x, (out_features, x.shape[1]), f"[D, c] with D = {out_features}, c = x.shape[1]")
    v.check_shape(op, "bias", bias, (out_features,), "[D]")
    tokens = conv_map_tokens(x, grid)
    if tokens.shape[:2] != (B, n):
        raise ValueError(f"{op}: x gives {tuple(tokens.shape[:2])} (images, tokens) on grid {grid}, y has {(B, n)}")
    out = torch.addmm(bias, y.reshape(B * n, d), weight_y.t()).view(B, n, out_features)
    return out.baddbmm_(tokens, weight_x.t().expand(B, -1, -1))
