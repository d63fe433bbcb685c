"""Native (CPU) launchers of the `fusion` family: LLaVA-HR's mixture-of-resolution adapter, token-major.

One adapter (fastmm/reference/fusion.py) is

    S  = resize(Wsp GELU(Wsc x + bsc) + bsp)          x: the high-resolution conv map
    F  = y + Wfp GELU(DWConv_kxk(y) + bdw) + bfp      y: the ViT stream [B, n, d]
    y' = F + tanh(W2 GELU(W1 [mean_t F ; mean_t S] + b1) + b2) S

Nearly all of its work is three GEMMs (Wsc, Wsp, Wfp), which torch runs; everything else is two passes of
fastmm._C over the token-major tensors (csrc/fusion.cpp). Inputs arrive validated by fastmm.ops: CPU,
contiguous (x may be channels-last instead), parameters in the activations' dtype, grids that match.

The slow branch: all A adapters' Wsc in one GEMM (stacked [A*c, c], bias added by the GEMM), GELU in place,
then per adapter one GEMM that writes S token-major. x is read in place in either layout: an NCHW image is
[c, hs*ws], so the hidden map comes out channel-major and the projection reads its transposed view; a
channels-last x is token-major [B*hs*ws, c] already. Average pooling runs on the hidden map, before the
projection: the projection is affine and the pooling weights sum to 1, so that is exact, and the projection
runs on f^2 times fewer tokens. Upsampling runs after it, on the fewer tokens, over a channels-last view.

The fusion: fusion_depthwise_gelu writes h = GELU(DWConv(y) + bdw) and, in the same pass, the token sums of y,
h and s. The gate needs only means, and mean_t F = mean_t y + Wfp mean_t h + bfp (F is affine in h), so F is
never materialized or re-read: Wfp mean_t h comes out of the one GEMM proj = h Wfp^T, as B extra rows of h
that hold mean_t h, and the rest of the gate is a few fp32 vector products. fusion_blend then writes
y' = y + proj + bfp + tanh(g) s in one pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastmm import _C
from fastmm.native._shared import threads_for


@functools.cache
def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the adapter's GEMMs run in for activations of ``dtype``: ``dtype`` itself where the CPU has
    16-bit matrix instructions (bf16: AVX512_BF16 or AMX-BF16; fp16: AVX512_FP16 or AMX-FP16), else float32.

    Without them torch's bf16 / fp16 CPU GEMMs take a slow path, over a hundred times slower than fp32 (the
    benchmark report's roofline line shows both on the machine it ran on). There the 16-bit operands are widened
    to fp32 once and the GEMM's result is rounded once, which is also closer to the reference (fp32 math, one
    rounding at the end).
    """
    caps = torch.cpu.get_capabilities()
    if dtype == torch.bfloat16 and (caps.get("avx512_bf16", False) or caps.get("amx_bf16", False)):
        return dtype
    if dtype == torch.float16 and (caps.get("avx512_fp16", False) or caps.get("amx_fp16", False)):
        return dtype
    return torch.float32


# ---- slow branch ------------------------------------------------------------------------------------------


def _resize_kind(source: tuple[int, int], grid: tuple[int, int]) -> str:
    """How a conv grid reaches the ViT grid, as fastmm.reference.fusion.resize_kind: "identity", "upsample"
    (smaller in both sides) or "pool" (the same integer multiple of both)."""
    (hs, ws), (gh, gw) = source, grid
    if (hs, ws) == (gh, gw):
        return "identity"
    if hs <= gh and ws <= gw:
        return "upsample"
    if hs >= gh and ws >= gw and hs % gh == 0 and ws % gw == 0 and hs // gh == ws // gw:
        return "pool"
    raise ValueError(f"resolution_slow_branch: no resize from a {(hs, ws)} grid to {grid}")


def _hidden(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(weight x + bias) for every adapter at once: x [B, c, hs, ws] NCHW or channels-last, weight [A*c, c],
    bias [A*c]. Returns [B, A*c, hs, ws]: contiguous for an NCHW x (one GEMM per image, W @ x_b), channels-last
    for a channels-last x (one GEMM over all tokens)."""
    B, c, hs, ws = x.shape
    if x.is_contiguous():
        hidden = torch.empty(B, weight.shape[0], hs * ws, dtype=x.dtype)
        images = x.view(B, c, hs * ws)
        for b in range(B):
            torch.addmm(bias[:, None], weight, images[b], out=hidden[b])
        hidden = hidden.view(B, -1, hs, ws)
    else:
        tokens = x.permute(0, 2, 3, 1).reshape(B * hs * ws, c)  # a view of channels-last x
        hidden = torch.addmm(bias, tokens, weight.t()).view(B, hs, ws, -1).permute(0, 3, 1, 2)
    return torch.ops.aten.gelu_(hidden)


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
    """out[a] = hidden_a^T weight[a]^T + bias[a] token-major: hidden [B, A*c, h, w] as _hidden returns it (or
    pooled), weight [A, d, c], bias [A, d], out [A, B, h*w, d]. The GEMMs read hidden in place."""
    B, _, h, w = hidden.shape
    A, d, c = weight.shape
    if hidden.is_contiguous():  # channel-major per image: adapter a's rows are [c, h*w], read transposed
        images = hidden.view(B, A * c, h * w)
        for a in range(A):
            for b in range(B):
                torch.addmm(bias[a], images[b, a * c : (a + 1) * c].t(), weight[a].t(), out=out[a, b])
    else:  # channels-last: token-major [B*h*w, A*c], adapter a's columns a*c .. (a+1)*c
        tokens = hidden.permute(0, 2, 3, 1).reshape(B * h * w, A * c)
        for a in range(A):
            torch.addmm(bias[a], tokens[:, a * c : (a + 1) * c], weight[a].t(), out=out[a].view(B * h * w, d))


def _upsample(s: torch.Tensor, source: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """s [A, B, hs*ws, d] bilinearly upsampled (align_corners=True) to grid, [A, B, gh*gw, d]: token-major data
    is a channels-last image, so this runs on views."""
    A, B, _, d = s.shape
    image = s.view(A * B, *source, d).permute(0, 3, 1, 2)
    up = F.interpolate(image, size=grid, mode="bilinear", align_corners=True)
    return up.permute(0, 2, 3, 1).reshape(A, B, grid[0] * grid[1], d)


def resolution_slow_branch_fwd(
    x: torch.Tensor,
    slow_conv_w: torch.Tensor,
    slow_conv_b: torch.Tensor,
    slow_proj_w: torch.Tensor,
    slow_proj_b: torch.Tensor,
    grid_h: int,
    grid_w: int,
) -> torch.Tensor:
    """S_a = resize(Wsp_a GELU(Wsc_a x + bsc_a) + bsp_a) for the A adapters, token-major.

    x [B, c, hs, ws] contiguous or channels-last; slow_conv_w [A, c, c]; slow_conv_b [A, c]; slow_proj_w
    [A, d, c]; slow_proj_b [A, d], all in x's dtype. Returns S [A, B, grid_h * grid_w, d] contiguous in x's
    dtype. GEMMs in gemm_dtype(x.dtype).
    """
    A, c, _ = slow_conv_w.shape
    B, _, hs, ws = x.shape
    dtype = gemm_dtype(x.dtype)
    kind = _resize_kind((hs, ws), (grid_h, grid_w))
    hidden = _hidden(x.to(dtype), slow_conv_w.reshape(A * c, c).to(dtype), slow_conv_b.reshape(A * c).to(dtype))
    if kind == "pool":
        factor = hs // grid_h
        hidden = F.avg_pool2d(hidden, factor, factor)
    h, w = hidden.shape[-2:]
    s = torch.empty(A, B, h * w, slow_proj_w.shape[1], dtype=dtype)
    _project(hidden, slow_proj_w.to(dtype), slow_proj_b.to(dtype), s)
    if kind == "upsample":
        s = _upsample(s, (h, w), (grid_h, grid_w))
    return s.to(x.dtype).contiguous()


# ---- fusion -----------------------------------------------------------------------------------------------


def _gate(
    sums: torch.Tensor,
    mean_h_proj: torch.Tensor,
    tokens: int,
    fast_proj_b: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
) -> torch.Tensor:
    """tanh(g) [B] float32, in fp32, from the token sums [B, 3, d] of y, h and s and mean_h_proj = mean_t h Wfp^T
    [B, d]: mean_t F = mean_t y + mean_t h Wfp^T + bfp (F is affine in h)."""
    means = sums / tokens
    mean_f = means[:, 0] + mean_h_proj.float() + fast_proj_b.float()
    pooled = torch.cat([mean_f, means[:, 2]], dim=1)
    hidden = F.gelu(torch.addmm(gate_b1.float(), pooled, gate_w1.float().t()))
    return torch.tanh(torch.addmm(gate_b2.float(), hidden, gate_w2.float().t())).reshape(-1)


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
    """y' = F + tanh(g) s, F = y + Wfp GELU(DWConv_kxk(y) + dw_b) + fast_proj_b (see the module docstring).

    y, s [B, n, d] with n = grid_h * grid_w; dw_w [d, k, k]; dw_b [d]; fast_proj_w [d, d]; fast_proj_b [d];
    gate_w1 [dg, 2d]; gate_b1 [dg]; gate_w2 [1, dg]; gate_b2 [1]; all contiguous in y's dtype. Returns
    [B, n, d] in y's dtype. h and the Wfp GEMM are in gemm_dtype(y.dtype); the gate is fp32.
    """
    B, n, d = y.shape
    k = dw_w.shape[-1]
    dtype = gemm_dtype(y.dtype)
    threads = threads_for(y.numel())
    taps = dw_w.reshape(d, k * k).t().float().contiguous()  # tap-major: a tap's d weights are adjacent
    h = torch.empty(B * n + B, d, dtype=dtype)  # rows B * n on: the token means of h
    sums = torch.empty(B, 3, d, dtype=torch.float32)
    _C.fusion_depthwise_gelu(y, s, taps, dw_b.float(), grid_h, grid_w, h[: B * n].view(B, n, d), sums, threads)
    h[B * n :].copy_(sums[:, 1] / n)
    proj = torch.mm(h, fast_proj_w.to(dtype).t())
    gate = _gate(sums, proj[B * n :], n, fast_proj_b, gate_w1, gate_b1, gate_w2, gate_b2)
    # In y's dtype, the blend runs in place on the GEMM's result: one large buffer fewer to allocate, and to
    # page-fault in afresh when the allocator has returned it to the system.
    proj = proj[: B * n].view(B, n, d)
    out = proj if dtype == y.dtype else torch.empty_like(y)
    _C.fusion_blend(y, s, proj, fast_proj_b.float(), gate, out, threads)
    return out
