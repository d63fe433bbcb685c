"""Triton kernels of the `fusion` family: LLaVA-HR's mixture-of-resolution adapter, token-major.

Semantics: ``fastmm.reference.fusion``. Inputs arrive validated from ``fastmm.ops.fusion``: contiguous
tensors on one device (x of the slow branch may also be channels-last), parameters in the activations' dtype.
Nothing here syncs the host, so both launchers can be captured in a CUDA graph.

The slow branch, S = resize(Wsp GELU(Wsc x + bsc) + bsp) for A adapters, is two GEMMs, which stay with torch
(cuBLAS): one for the first 1x1 conv of every adapter at once (weights viewed [A*c, c]) and one per adapter
for the second, both over views of x and of the hidden map (no activation is transposed or copied), the
bias bsp added by the GEMM itself. Between them one Triton kernel adds bsc and applies the exact GELU in
place. Resizing runs F.interpolate / F.avg_pool2d on channels-last views of the token-major result.

The fast branch and the blend, y' = F + tanh(g) S with F = y + Wfp GELU(DWConv(y) + bdw) + bfp:
- ``_depthwise_gelu_kernel`` computes h = GELU(DWConv(y) + bdw) on the token-major grid itself (no NCHW
  round trip): one program per (image, BLOCK_T tokens, BLOCK_C channels), one loop over the k*k taps, each a
  [BLOCK_T, BLOCK_C] load of neighbouring tokens, contiguous along channels, zero outside the grid. The same
  program adds its per-channel sums of y, h (as stored) and s into an fp32 [B, 3, d] buffer (atomics), so
  the gate needs no pass over F: the token mean of F is mean(y) + mean(h) Wfp^T + bfp exactly.
- the gate, from those means, in torch fp32 ([B, 2d] x [2d, dg]: tiny).
- proj = h Wfp^T, a torch GEMM.
- ``_blend_kernel``: y' = y + proj + bfp + tanh(g)[b] s in fp32, one cast.
The atomics make the gate's sums order-dependent in their last bits; everything else is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastmm.reference.fusion import resize_to_grid
from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["resolution_fusion_fwd", "resolution_slow_branch_fwd"]

# Every kernel here works on [BLOCK_R rows, BLOCK_C columns] tiles, contiguous along the columns (channels,
# or the tokens of an NCHW hidden map): 16 elements per thread at 4 warps, rows read as 16-byte vectors.
# Fixed sizes: one compiled variant per dtype (and bias axis), masks for the narrow widths.
_BLOCK_R = 16
_BLOCK_C = 128
_NUM_WARPS = 4
# No software pipelining: the elementwise kernels have no loop, and the depthwise tap loop's loads are masked
# gathers that Triton does not stage through shared memory (checked: no async copies at 3 stages either).
_NUM_STAGES = 1


@triton.jit
def _gelu(x):
    """Exact (erf) GELU of fp32 x."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


# ----------------------------------------------------------------------------------------------------
# Slow branch
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_kernel(
    H,  # [R, C] contiguous, rewritten in place with GELU(H + bias)
    BIAS,  # [bias_len] bias of the first 1x1 conv of every adapter, flattened
    R,
    C,
    bias_len,  # A * c: row r reads BIAS[r % bias_len] when BIAS_PER_ROW
    BIAS_PER_ROW: tl.constexpr,  # NCHW hidden [B * A * c, hw]: bias along rows; channels-last: along columns
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = rows < R
    c_mask = cols < C
    mask = r_mask[:, None] & c_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    h = tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32)
    if BIAS_PER_ROW:
        h += tl.load(BIAS + rows % bias_len, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    else:
        h += tl.load(BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(H + offsets, cast(_gelu(h), H.dtype.element_ty), mask=mask)


def _bias_gelu_(hidden: torch.Tensor, bias: torch.Tensor, bias_per_row: bool) -> None:
    """hidden [R, C] (a contiguous view) = GELU(hidden + bias) in place, bias [A * c] along rows (repeating
    every A * c rows) or along columns."""
    R, C = hidden.shape
    if hidden.numel() == 0:
        return
    grid = (triton.cdiv(R, _BLOCK_R), triton.cdiv(C, _BLOCK_C))
    _bias_gelu_kernel[grid](
        hidden, bias, R, C, bias.numel(), BIAS_PER_ROW=bias_per_row,
        BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )  # fmt: skip


def _hidden(x: torch.Tensor, slow_conv_w: torch.Tensor, slow_conv_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GELU(Wsc x + bsc) of every adapter, one GEMM, in the layout x has. Returns A views [B, hw, c]:
    adapter a's hidden map, token-major."""
    A, c, _ = slow_conv_w.shape
    B, _, hs, ws = x.shape
    hw = hs * ws
    w_all = slow_conv_w.view(A * c, c)
    if x.is_contiguous():
        # NCHW: per image x_b [c, hw], hidden_b = W_all x_b [A * c, hw]; adapter a's rows, transposed.
        hidden = torch.bmm(w_all.expand(B, A * c, c), x.view(B, c, hw))
        _bias_gelu_(hidden.view(B * A * c, hw), slow_conv_b.view(-1), bias_per_row=True)
        return tuple(hidden.view(B, A, c, hw)[:, a].transpose(1, 2) for a in range(A))
    # channels-last: the tokens [B * hw, c] are a free view; hidden [B * hw, A * c], adapter a's columns.
    hidden = x.permute(0, 2, 3, 1).reshape(B * hw, c) @ w_all.t()
    _bias_gelu_(hidden, slow_conv_b.view(-1), bias_per_row=False)
    return tuple(hidden.view(B, hw, A, c)[:, :, a] for a in range(A))


def resolution_slow_branch_fwd(
    x: torch.Tensor,
    slow_conv_w: torch.Tensor,
    slow_conv_b: torch.Tensor,
    slow_proj_w: torch.Tensor,
    slow_proj_b: torch.Tensor,
    grid_h: int,
    grid_w: int,
) -> torch.Tensor:
    """Every adapter's S. x [B, c, hs, ws] (NCHW or channels-last); slow_conv_w [A, c, c]; slow_conv_b
    [A, c]; slow_proj_w [A, d, c]; slow_proj_b [A, d]. Returns S [A, B, grid_h * grid_w, d] contiguous in
    x's dtype."""
    A, d, c = slow_proj_w.shape
    B, _, hs, ws = x.shape
    s = torch.empty(A, B, hs * ws, d, dtype=x.dtype, device=x.device)
    for a, hidden_a in enumerate(_hidden(x, slow_conv_w, slow_conv_b)):
        # Wsp_a as a [B, c, d] batch of one matrix (stride 0: no copy), bsp_a added by the GEMM.
        torch.baddbmm(slow_proj_b[a], hidden_a, slow_proj_w[a].t().expand(B, c, d), out=s[a])
    if (hs, ws) == (grid_h, grid_w):
        return s
    # s [A, B, hs * ws, d] is the channels-last layout of maps [A * B, d, hs, ws]: resize that view, which
    # keeps channels-last, and read it back token-major (a view; a copy only if torch changed the layout).
    maps = s.view(A * B, hs, ws, d).permute(0, 3, 1, 2)
    resized = resize_to_grid(maps, (grid_h, grid_w))
    return resized.permute(0, 2, 3, 1).reshape(A, B, grid_h * grid_w, d)


# ----------------------------------------------------------------------------------------------------
# Fast branch and blend
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _depthwise_gelu_kernel(
    Y,  # [B, n, d] ViT tokens, token t = row * grid_w + col
    S,  # [B, n, d] slow branch, read only for its channel sums
    W,  # [k * k, d] fp32 depthwise kernel, tap-major (tap = i * k + j)
    BIAS,  # [d] depthwise bias
    H,  # [B, n, d] out: GELU(DWConv(y) + bias), Y's dtype
    SUMS,  # [B, 3, d] fp32, zero-filled: per image, channel sums over tokens of y, h (as stored) and s
    n,
    d,
    grid_h,
    grid_w,
    k,  # odd kernel size; zero padding k // 2
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    b = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = tokens < n
    c_mask = chans < d
    mask = t_mask[:, None] & c_mask[None, :]
    image = b * n * d
    row = tokens // grid_w
    col = tokens % grid_w
    pad = k // 2

    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for tap in range(k * k):
        r = row + tap // k - pad
        q = col + tap % k - pad
        inside = t_mask & (r >= 0) & (r < grid_h) & (q >= 0) & (q < grid_w)
        v = tl.load(Y + image + (r * grid_w + q)[:, None] * d + chans[None, :],
                    mask=inside[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
        w = tl.load(W + tap * d + chans, mask=c_mask, other=0.0)
        acc += v.to(tl.float32) * w[None, :]
    acc += tl.load(BIAS + chans, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    h = cast(_gelu(acc), H.dtype.element_ty)
    offsets = image + tokens[:, None] * d + chans[None, :]
    tl.store(H + offsets, h, mask=mask)

    # The gate's token means. Masked tokens hold GELU(bias) in h: excluded.
    y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offsets, mask=mask, other=0.0).to(tl.float32)
    h_sum = tl.sum(tl.where(mask, h.to(tl.float32), 0.0), axis=0)
    sums = SUMS + b * 3 * d + chans
    tl.atomic_add(sums, tl.sum(y, axis=0), mask=c_mask, sem="relaxed")
    tl.atomic_add(sums + d, h_sum, mask=c_mask, sem="relaxed")
    tl.atomic_add(sums + 2 * d, tl.sum(s, axis=0), mask=c_mask, sem="relaxed")


@triton.jit
def _blend_kernel(
    Y,  # [B * n, d]
    P,  # [B * n, d] h Wfp^T
    S,  # [B * n, d]
    BIAS,  # [d] fast projection bias
    GATE,  # [B] fp32 tanh(g)
    OUT,  # [B * n, d] out, Y's dtype
    rows_total,  # B * n
    n,
    d,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = rows < rows_total
    c_mask = cols < d
    mask = r_mask[:, None] & c_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
    y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + rows // n, mask=r_mask, other=0.0)
    out = y + p + bias[None, :] + gate[:, None] * s
    tl.store(OUT + offsets, cast(out, OUT.dtype.element_ty), mask=mask)


def _depthwise_gelu(y, s, dw_w, dw_b, grid_h, grid_w):
    """(h [B, n, d] in y's dtype, sums [B, 3, d] fp32: channel sums over tokens of y, h and s)."""
    B, n, d = y.shape
    k = dw_w.shape[-1]
    h = torch.empty_like(y)
    sums = torch.zeros(B, 3, d, dtype=torch.float32, device=y.device)
    if y.numel() == 0:
        return h, sums
    taps = dw_w.reshape(d, k * k).t().float().contiguous()  # [k * k, d]: a tap's weights are contiguous
    grid = (B, triton.cdiv(n, _BLOCK_R), triton.cdiv(d, _BLOCK_C))
    _depthwise_gelu_kernel[grid](
        y, s, taps, dw_b, h, sums, n, d, grid_h, grid_w, k,
        BLOCK_T=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )  # fmt: skip
    return h, sums


def _gate(sums, n, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2):
    """tanh(g) [B] fp32 from the channel sums: the token mean of F is mean(y) + mean(h) Wfp^T + bfp."""
    mean_y, mean_h, mean_s = (sums / n).unbind(1)
    mean_fused = mean_y + mean_h @ fast_proj_w.float().t() + fast_proj_b.float()
    hidden = F.gelu(torch.cat([mean_fused, mean_s], dim=1) @ gate_w1.float().t() + gate_b1.float())
    return torch.tanh(hidden @ gate_w2.float().t() + gate_b2.float()).reshape(-1)


def resolution_fusion_fwd(
    y: torch.Tensor,
    s: torch.Tensor,
    dw_w: torch.Tensor,
    dw_b: torch.Tensor,
    fast_proj_w: torch.Tensor,
    fast_proj_b: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    grid_h: int,
    grid_w: int,
) -> torch.Tensor:
    """y' = F + tanh(g) S. y, s [B, n, d] with n = grid_h * grid_w; dw_w [d, k, k]; dw_b [d]; fast_proj_w
    [d, d]; fast_proj_b [d]; gate_w1 [dg, 2d]; gate_b1 [dg]; gate_w2 [1, dg]; gate_b2 [1]. Returns
    [B, n, d] in y's dtype."""
    B, n, d = y.shape
    h, sums = _depthwise_gelu(y, s, dw_w, dw_b, grid_h, grid_w)
    gate = _gate(sums, n, fast_proj_w, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2)
    proj = h.view(B * n, d) @ fast_proj_w.t()
    out = torch.empty_like(y)
    if y.numel() == 0:
        return out
    grid = (triton.cdiv(B * n, _BLOCK_R), triton.cdiv(d, _BLOCK_C))
    _blend_kernel[grid](
        y, proj, s, fast_proj_b, gate, out, B * n, n, d,
        BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

# Each kernel's ``divisible`` below: the integer arguments that are multiples of 16 at real sizes, d = 1024
# on a 32 x 32 grid (n = 1024) and the slow branch's hidden map of 1024 tokens x A * c = 3 * 1536 (R, C and
# bias_len in either layout). k (7) is not.


def _aot_config(kernel, dtype, pointers, constexprs, divisible, variant=""):
    """One launch of ``kernel`` with the tile sizes above: ``pointers`` typed, ``constexprs`` fixed."""
    signature = aot_signature(kernel, pointers, constexprs)
    label = f"{dtype} {variant}{_BLOCK_R}x{_BLOCK_C} w{_NUM_WARPS} s{_NUM_STAGES}"
    return AotConfig(label, signature, constexprs, _NUM_WARPS, _NUM_STAGES, divisible)


def _bias_gelu_aot_configs() -> list[AotConfig]:
    return [
        _aot_config(
            _bias_gelu_kernel, dtype, {"H": f"*{dtype}", "BIAS": f"*{dtype}"},
            {"BIAS_PER_ROW": per_row, "BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C},
            ("R", "C", "bias_len"), "bias per row (NCHW) " if per_row else "bias per column (channels-last) ",
        )  # fmt: skip
        for dtype in TRITON_DTYPE.values()
        for per_row in (True, False)
    ]


def _depthwise_aot_configs() -> list[AotConfig]:
    return [
        _aot_config(
            _depthwise_gelu_kernel, dtype,
            {name: f"*{dtype}" for name in ("Y", "S", "BIAS", "H")} | {"W": "*fp32", "SUMS": "*fp32"},
            {"BLOCK_T": _BLOCK_R, "BLOCK_C": _BLOCK_C}, ("n", "d", "grid_h", "grid_w"),
        )  # fmt: skip
        for dtype in TRITON_DTYPE.values()
    ]


def _blend_aot_configs() -> list[AotConfig]:
    return [
        _aot_config(
            _blend_kernel, dtype,
            {name: f"*{dtype}" for name in ("Y", "P", "S", "BIAS", "OUT")} | {"GATE": "*fp32"},
            {"BLOCK_R": _BLOCK_R, "BLOCK_C": _BLOCK_C}, ("rows_total", "n", "d"),
        )  # fmt: skip
        for dtype in TRITON_DTYPE.values()
    ]


register_aot(_bias_gelu_kernel, _bias_gelu_aot_configs())
register_aot(_depthwise_gelu_kernel, _depthwise_aot_configs())
register_aot(_blend_kernel, _blend_aot_configs())
