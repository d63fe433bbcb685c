"""Triton kernels of the `norm` family: modality-adaptive RMSNorm / LayerNorm.

Every row t of x belongs to modality m_t and reads that modality's parameters (weight[m_t], bias[m_t]),
so one launch serves every modality with no gather, scatter or host sync (mPLUG-Owl2's reference does
one ``nonzero`` per modality). Semantics: ``fastmm.reference.norm``.

Inputs arrive validated by ``fastmm.ops.norm``: one device, contiguous, x in fp32 / fp16 / bf16 with
weight, bias and residual of the same dtype, modality int64 with every value in [0, M). Nothing here
syncs the host, so every launcher can be captured in a CUDA graph.

Layout of the launch configurations: one program per row, the whole row in registers (BLOCK_D =
next_power_of_2(D), at least 128, at most MAX_D), num_warps growing with BLOCK_D. Backward programs each
own a contiguous run of rows and accumulate dweight / dbias per modality into a private fp32 slot of a
[programs, M, D] buffer, summed over programs by torch afterwards: deterministic, no atomics.

Rows wider than MAX_D do not fit in registers: the four norm entry points then run
``fastmm.reference.norm`` instead (same interface, fp32 math), with one logged warning per op.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastmm import backend
from fastmm.reference import norm as reference
from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast, num_sms
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["MAX_D", "layer_norm_bwd", "layer_norm_fwd", "rms_norm_bwd", "rms_norm_fwd"]

# Largest hidden size the norm kernels hold in registers (LLaMA-2-70B / Chameleon-34B: 8192).
MAX_D = 8192
_MIN_BLOCK_D = 128  # smaller rows still get one warp's worth of lanes: one compiled variant, not eight



# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def _norm_block(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for a row of D elements: the whole row in registers, 8 to 16 per thread."""
    if D > MAX_D:
        raise ValueError(f"norm kernels hold a row in registers: expected D <= {MAX_D}, got D={D}")
    block_d = max(triton.next_power_of_2(D), _MIN_BLOCK_D)
    return block_d, min(max(block_d // 256, 1), 16)


def _too_wide(op: str, D: int) -> bool:
    """True (after one logged warning) when rows of D elements must go to the reference implementation."""
    if D <= MAX_D:
        return False
    backend.warn_fallback(op, "triton", "reference", f"D={D} exceeds the register-resident row limit {MAX_D}")
    return True


_NORM_BLOCKS = tuple(_norm_block(1 << p) for p in range(7, MAX_D.bit_length()))  # (128, 1) .. (8192, 16)
# No software pipelining: the forward has no loop, and the backward's row loop would stage whole rows in
# shared memory (up to 3 x 32 KiB per stage) for little gain; the persistent grid keeps enough warps busy.
_NORM_STAGES = 1


def _row_split(T: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) of the persistent backward grid: contiguous row runs, none empty.

    About 16 warps per SM (one program at BLOCK_D >= 4096, sixteen at one warp each), so the partial
    dweight buffer stays near num_SMs * 16 * 256 * M * 4 bytes whatever D is (4.3 MB on an H100, M = 2).
    Under the interpreter: 4 programs, so the row loop and the modality flushes run.
    """
    programs = num_sms(device) * max(16 // num_warps, 1) if device.type == "cuda" else 4
    rows_per_program = triton.cdiv(T, min(T, programs))
    return triton.cdiv(T, rows_per_program), rows_per_program


# ----------------------------------------------------------------------------------------------------
# RMSNorm / LayerNorm forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _modality_of(ptr, num_modalities):
    """The modality id at ptr, clamped to [0, num_modalities): an id out of range (never valid input, but
    unchecked while a CUDA graph is captured) reads some modality's weights instead of memory out of bounds."""
    return tl.minimum(tl.maximum(tl.load(ptr), 0), num_modalities - 1)


@triton.jit
def _norm_fwd_kernel(
    X,  # [T, D] input rows
    RESIDUAL,  # [T, D] added to X first when HAS_RESIDUAL (else X again, never read)
    RESIDUAL_OUT,  # [T, D] s = X + RESIDUAL in X's dtype, written when HAS_RESIDUAL (else X, never written)
    MODALITY,  # [T] int64 modality of each row
    W,  # [M, D] weight of each modality
    B,  # [M, D] bias of each modality when HAS_BIAS (else W, never read)
    Y,  # [T, D] output, X's dtype
    MEAN,  # [T] fp32 row mean, written when not IS_RMS (else RSTD, never written)
    RSTD,  # [T] fp32 1 / sqrt(mean(s^2) + eps) (RMS) or 1 / sqrt(var(s) + eps) (LayerNorm)
    stride_x_t,
    stride_res_t,
    stride_res_out_t,
    stride_mod_t,
    stride_w_m,
    stride_b_m,
    stride_y_t,
    D,  # row length (the last dimension of every [.., D] tensor has unit stride)
    num_modalities,  # M: ids are clamped to [0, M) (fastmm.ops cannot check them inside a CUDA-graph capture)
    eps,
    IS_RMS: tl.constexpr,  # which norm the caller asked for: RMSNorm (True) or LayerNorm (False)
    HAS_RESIDUAL: tl.constexpr,  # the caller passed a residual
    HAS_BIAS: tl.constexpr,  # the caller passed a bias (LayerNorm only)
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(D), 128), set by the launcher: the whole row at once
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    s = tl.load(X + row * stride_x_t + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + row * stride_res_t + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype, as an unfused pipeline would, and hand it back.
        s = cast(s.to(tl.float32) + residual.to(tl.float32), s.dtype)
        tl.store(RESIDUAL_OUT + row * stride_res_out_t + cols, s, mask=mask)
    s = s.to(tl.float32)

    if IS_RMS:
        centered = s
    else:
        mean = tl.sum(s, axis=0) / D
        centered = tl.where(mask, s - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)

    m = _modality_of(MODALITY + row * stride_mod_t, num_modalities)
    w = tl.load(W + m * stride_w_m + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w
    if HAS_BIAS:
        y += tl.load(B + m * stride_b_m + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_t + cols, cast(y, Y.dtype.element_ty), mask=mask)


def _norm_fwd(x, modality, weight, bias, residual, eps, is_rms):
    T, D = x.shape
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(T, dtype=torch.float32, device=x.device)
    mean = None if is_rms else torch.empty(T, dtype=torch.float32, device=x.device)
    if T == 0:
        return y, residual_out, mean, rstd
    block_d, num_warps = _norm_block(D)
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else x
    b = bias if bias is not None else weight
    _norm_fwd_kernel[(T,)](
        x, res, res_out, modality, weight, b, y, mean if mean is not None else rstd, rstd,
        x.stride(0), res.stride(0), res_out.stride(0), modality.stride(0), weight.stride(0), b.stride(0),
        y.stride(0), D, weight.shape[0], eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_D=block_d, num_warps=num_warps, num_stages=_NORM_STAGES,
    )  # fmt: skip
    return y, residual_out, mean, rstd


def rms_norm_fwd(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Modality-adaptive RMSNorm. x [T, D]; modality [T] int64; weight [M, D]; residual [T, D] or None.

    Returns (y [T, D] x.dtype, residual_out [T, D] or None, rstd [T] fp32), with s = x (+ residual,
    rounded to x.dtype and returned as residual_out), rstd = rsqrt(mean(s^2) + eps) and
    y = s * rstd * weight[modality].
    """
    if _too_wide("modality_rms_norm", x.shape[1]):
        return reference.rms_norm_fwd(x, modality, weight, residual, eps)
    y, residual_out, _, rstd = _norm_fwd(x, modality, weight, None, residual, eps, is_rms=True)
    return y, residual_out, rstd


def layer_norm_fwd(
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Modality-adaptive LayerNorm (biased variance). x [T, D]; weight, bias [M, D]; residual [T, D] or None.

    Returns (y [T, D] x.dtype, residual_out or None, mean [T] fp32, rstd [T] fp32), with
    y = (s - mean) * rstd * weight[modality] (+ bias[modality]).
    """
    if _too_wide("modality_layer_norm", x.shape[1]):
        return reference.layer_norm_fwd(x, modality, weight, bias, residual, eps)
    return _norm_fwd(x, modality, weight, bias, residual, eps, is_rms=False)


# ----------------------------------------------------------------------------------------------------
# RMSNorm / LayerNorm backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _norm_bwd_kernel(
    DY,  # [T, D] gradient of y
    DRESIDUAL_OUT,  # [T, D] gradient of residual_out, added to dx when HAS_DRESIDUAL (else DY, never read)
    X,  # [T, D] the normalized input s (x + residual when the forward had one)
    MODALITY,  # [T] int64
    W,  # [M, D]
    MEAN,  # [T] fp32 saved by the forward (LayerNorm; RSTD when IS_RMS, never read)
    RSTD,  # [T] fp32 saved by the forward
    DX,  # [T, D] gradient of s, X's dtype
    DW_PARTIAL,  # [programs, M, D] fp32, zero-filled: this program's dweight per modality
    DB_PARTIAL,  # [programs, M, D] fp32, zero-filled, when HAS_BIAS (else DW_PARTIAL, never touched)
    stride_dy_t,
    stride_dres_t,
    stride_x_t,
    stride_mod_t,
    stride_w_m,
    stride_dx_t,
    stride_part_p,  # DW_PARTIAL and DB_PARTIAL share one layout
    stride_part_m,
    T,
    D,
    num_modalities,  # M: ids are clamped to [0, M), as in the forward
    rows_per_program,  # program pid owns rows [pid * rows_per_program, (pid + 1) * rows_per_program) within T
    IS_RMS: tl.constexpr,  # RMSNorm (True) or LayerNorm (False), as in the forward
    HAS_DRESIDUAL: tl.constexpr,  # the forward had a residual and its output received a gradient
    HAS_BIAS: tl.constexpr,  # the forward had a bias (LayerNorm only): accumulate dbias
    BLOCK_D: tl.constexpr,  # max(next_power_of_2(D), 128), set by the launcher, as in the forward
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, T)

    # dweight / dbias of the current run of same-modality rows stay in registers and are flushed into
    # this program's slot of the partial buffers when the modality changes (images are contiguous spans,
    # so that is rare) and at the end.
    current = _modality_of(MODALITY + row_start * stride_mod_t, num_modalities)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for row in range(row_start, row_end):
        m = _modality_of(MODALITY + row * stride_mod_t, num_modalities)
        if m != current:
            dw_ptr = DW_PARTIAL + pid * stride_part_p + current * stride_part_m + cols
            tl.store(dw_ptr, tl.load(dw_ptr, mask=mask) + dw, mask=mask)
            if HAS_BIAS:
                db_ptr = DB_PARTIAL + pid * stride_part_p + current * stride_part_m + cols
                tl.store(db_ptr, tl.load(db_ptr, mask=mask) + db, mask=mask)
            dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
            db = tl.zeros((BLOCK_D,), dtype=tl.float32)
            current = m

        x = tl.load(X + row * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_t + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + m * stride_w_m + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = dy * w
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / D)
        if not IS_RMS:
            dx -= tl.sum(g, axis=0) / D
        dx *= rstd
        if HAS_DRESIDUAL:
            dx += tl.load(DRESIDUAL_OUT + row * stride_dres_t + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx_t + cols, cast(dx, DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy

    dw_ptr = DW_PARTIAL + pid * stride_part_p + current * stride_part_m + cols
    tl.store(dw_ptr, tl.load(dw_ptr, mask=mask) + dw, mask=mask)
    if HAS_BIAS:
        db_ptr = DB_PARTIAL + pid * stride_part_p + current * stride_part_m + cols
        tl.store(db_ptr, tl.load(db_ptr, mask=mask) + db, mask=mask)


def _norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd, has_bias, is_rms):
    T, D = x_in.shape
    M = weight.shape[0]
    dx = torch.empty_like(x_in)
    if T == 0:
        dweight = torch.zeros(M, D, dtype=torch.float32, device=x_in.device)
        return dx, dweight, torch.zeros_like(dweight) if has_bias else None
    block_d, num_warps = _norm_block(D)
    programs, rows_per_program = _row_split(T, num_warps, x_in.device)
    dw_partial = torch.zeros(programs, M, D, dtype=torch.float32, device=x_in.device)
    db_partial = torch.zeros_like(dw_partial) if has_bias else dw_partial
    dres = dresidual_out if dresidual_out is not None else dy
    _norm_bwd_kernel[(programs,)](
        dy, dres, x_in, modality, weight, mean if mean is not None else rstd, rstd, dx,
        dw_partial, db_partial,
        dy.stride(0), dres.stride(0), x_in.stride(0), modality.stride(0), weight.stride(0), dx.stride(0),
        dw_partial.stride(0), dw_partial.stride(1), T, D, M, rows_per_program,
        IS_RMS=is_rms, HAS_DRESIDUAL=dresidual_out is not None, HAS_BIAS=has_bias,
        BLOCK_D=block_d, num_warps=num_warps, num_stages=_NORM_STAGES,
    )  # fmt: skip
    return dx, dw_partial.sum(0), db_partial.sum(0) if has_bias else None


def rms_norm_bwd(
    dy: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    x_in: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``rms_norm_fwd``. dy, x_in (the normalized s) [T, D]; rstd [T] fp32 from the forward.

    Returns (dx [T, D] x_in.dtype: gradient of s, plus dresidual_out when given; dweight [M, D] fp32).
    """
    if _too_wide("modality_rms_norm", x_in.shape[1]):
        return reference.rms_norm_bwd(dy, dresidual_out, x_in, modality, weight, rstd)
    dx, dweight, _ = _norm_bwd(dy, dresidual_out, x_in, modality, weight, None, rstd, False, is_rms=True)
    return dx, dweight


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
    """Backward of ``layer_norm_fwd``. Returns (dx [T, D] x_in.dtype, dweight [M, D] fp32, dbias [M, D] fp32
    or None when the forward had no bias)."""
    if _too_wide("modality_layer_norm", x_in.shape[1]):
        return reference.layer_norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd, has_bias)
    return _norm_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd, has_bias, is_rms=False)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------


def _norm_aot_configs(kernel, backward: bool) -> list[AotConfig]:
    """Every (dtype, BLOCK_D with its num_warps) for RMSNorm with a residual and LayerNorm with a residual
    and a bias: the heaviest variant of each (the launches without residual or bias compile the same code
    minus a load or two). The modality stride is constexpr 1, as the JIT specializes it."""
    residual_flag = "HAS_DRESIDUAL" if backward else "HAS_RESIDUAL"
    configs = []
    blocks = itertools.product(TRITON_DTYPE.values(), _NORM_BLOCKS, (True, False))
    for dtype, (block_d, num_warps), is_rms in blocks:
        constexprs = {"IS_RMS": is_rms, residual_flag: True, "HAS_BIAS": not is_rms, "BLOCK_D": block_d}
        constexprs["stride_mod_t"] = 1
        activations = ("X", "RESIDUAL", "RESIDUAL_OUT", "DRESIDUAL_OUT", "W", "B", "Y", "DY", "DX")
        pointers = {name: f"*{dtype}" for name in activations} | {"MODALITY": "*i64"}
        pointers |= {name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")}
        norm = "rms" if is_rms else "layer+bias"
        label = f"{dtype} {norm} +{residual_flag[4:].lower()} BLOCK_D={block_d} w{num_warps}"
        signature = aot_signature(kernel, pointers, constexprs, floats=("eps",))
        configs.append(
            AotConfig(label, signature, constexprs, num_warps, _NORM_STAGES, ("D", "stride*"))
        )
    return configs


register_aot(_norm_fwd_kernel, _norm_aot_configs(_norm_fwd_kernel, backward=False))
register_aot(_norm_bwd_kernel, _norm_aot_configs(_norm_bwd_kernel, backward=True))
