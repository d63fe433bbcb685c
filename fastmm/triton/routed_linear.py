"""Triton kernels of the `routed_linear` family: routed (per-modality) linear projections (mPLUG-Owl2).

y_t = weight[m_t] @ x_t (+ bias[m_t]): every row t of x belongs to modality m_t and is multiplied by that
modality's weight only, so one launch serves every modality with no host-side gather, scatter or sync
(mPLUG-Owl2's reference does one ``nonzero`` per modality). Semantics: ``fastmm.reference.routed_linear``.

Inputs arrive validated by ``fastmm.ops.routed_linear``: one device, contiguous, x in fp32 / fp16 / bf16
with weight and bias of the same dtype, modality int64 with every value in [0, M). Nothing here syncs the
host, so every launcher can be captured in a CUDA graph.

Layout of the launch configurations: rows are counting-sorted by modality on device (one small kernel
writes the stable permutation and the group offsets), then a grouped GEMM whose BLOCK_M tiles each lie
inside one modality's rows; the grid is sized for the worst case (cdiv(T, BLOCK_M) + M - 1 row tiles) and
tiles past the last group exit at once. dx reuses it with the weight read transposed through strides.
Weight gradients: one program per (N tile, K tile, modality) looping over that modality's rows. fp32 GEMM
inputs multiply with tf32x3 (see fastmm.triton._shared.dot); fp16 / bf16 on tensor cores; fp32 accumulation.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast, dot
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["routed_linear_bwd", "routed_linear_fwd"]

# ----------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------

_ROUTE_BLOCK = 1024
_ROUTE_WARPS = 4


@triton.jit
def _route_rows_kernel(
    MODALITY,  # [T] int64
    PERM,  # [T] int32 out: original row at each position of the stable modality-sorted order
    OFFSETS,  # [M + 1] int32 out: modality m owns positions [OFFSETS[m], OFFSETS[m + 1]) of PERM
    T,
    M,
    stride_mod_t,
    BLOCK: tl.constexpr,  # rows scanned per step (fixed: 1024); one program does the whole counting sort
):
    offs = tl.arange(0, BLOCK)
    base = 0
    tl.store(OFFSETS, base)
    for m in range(M):
        for start in range(0, T, BLOCK):
            rows = start + offs
            modality = tl.load(MODALITY + rows.to(tl.int64) * stride_mod_t, mask=rows < T, other=-1)
            hit = (modality == m).to(tl.int32)
            tl.store(PERM + base + tl.cumsum(hit, axis=0) - 1, rows, mask=hit != 0)
            base += tl.sum(hit, axis=0)
        tl.store(OFFSETS + m + 1, base)


def _route_rows(modality: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the rows by modality, on device: (perm [T] int32, offsets [M + 1] int32).

    Not torch.bincount (its CUDA version reads max(modality) back to the host) nor argsort.
    """
    T = modality.shape[0]
    perm = torch.empty(T, dtype=torch.int32, device=modality.device)
    offsets = torch.empty(M + 1, dtype=torch.int32, device=modality.device)
    _route_rows_kernel[(1,)](
        modality, perm, offsets, T, M, modality.stride(0),
        BLOCK=_ROUTE_BLOCK, num_warps=_ROUTE_WARPS, num_stages=1,
    )  # fmt: skip
    return perm, offsets


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM (forward, and dx with the weight transposed)
# ----------------------------------------------------------------------------------------------------


_EIGHT_WARP_TILE = {2: 128 * 128, 4: 64 * 64}  # output tile area from which a GEMM config uses 8 warps


def _routed_configs(elem: int) -> list[triton.Config]:
    """Grouped-GEMM configs for inputs of ``elem`` bytes (2: fp16 / bf16, 4: fp32).

    Row tiles of 16 (decode: few rows; fp16 / bf16 stream the weight with 256-byte K tiles), 64 and 128
    (prefill); K tiles of 128 bytes otherwise. tf32x3 holds two halves of every fp32 operand in registers,
    so fp32 takes 8 warps from 64 x 64 tiles on (16-bit inputs from 128 x 128) and keeps to 64 columns:
    wider fp32 tiles spill.
    """
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": k_bytes // elem, "GROUP_M": 8},
            num_warps=warps,
            num_stages=3 if warps == 8 or bm == 128 else 4,
        )
        for bm, bn in itertools.product((16, 64, 128), (64, 128))
        for k_bytes in [256 if bm == 16 and elem == 2 else 128]
        for warps in [8 if bm * bn >= _EIGHT_WARP_TILE[elem] else 4]
        if elem == 2 or bn == 64
    ]


_ROUTED_CONFIGS = {elem: _routed_configs(elem) for elem in (2, 4)}


def _rows_bucket(T: int) -> int:
    """Autotune key for the number of rows: a power of two in [16, 1024] (decode vs prefill)."""
    return min(max(triton.next_power_of_2(T), 16), 1024)


def _prune_routed(configs, named_args, **kwargs):
    """This dtype's configs, with a row tile no taller than the rows there are (decode: BLOCK_M 16 only).

    Under the interpreter only the last of them (the tallest row tile) runs: nothing to time there.
    """
    own = [c for c in configs if c in _ROUTED_CONFIGS[named_args["X"].element_size()]]
    kept = [c for c in own if c.kwargs["BLOCK_M"] <= named_args["ROWS_BUCKET"]] or own[:1]
    return kept[-1:] if triton.knobs.runtime.interpret else kept


@triton.autotune(
    configs=_ROUTED_CONFIGS[2] + _ROUTED_CONFIGS[4],
    key=["N", "K", "ROWS_BUCKET", "stride_w_k"],  # stride_w_k: 1 for the forward, not for dx (weight^T)
    prune_configs_by={"early_config_prune": _prune_routed},
)
@triton.jit
def _routed_linear_kernel(
    X,  # [T, K] input rows
    W,  # [M, N, K] weight, addressed through strides (dx passes weight^T as [M, K, N] this way)
    B,  # [M, N] bias when HAS_BIAS (else W, never read)
    Y,  # [T, N] output, X's dtype
    PERM,  # [T] int32 rows in stable modality order (from _route_rows_kernel)
    OFFSETS,  # [M + 1] int32 modality m owns positions [OFFSETS[m], OFFSETS[m + 1]) of PERM
    T,
    N,
    K,
    M,
    ROWS_BUCKET,  # autotune key only: _rows_bucket(T)
    stride_x_t,
    stride_x_k,
    stride_w_m,
    stride_w_n,
    stride_w_k,
    stride_b_m,
    stride_b_n,
    stride_y_t,
    stride_y_n,
    HAS_BIAS: tl.constexpr,  # the caller passed a bias
    BLOCK_M: tl.constexpr,  # rows per tile, autotuned
    BLOCK_N: tl.constexpr,  # output columns per tile, autotuned
    BLOCK_K: tl.constexpr,  # reduction step, autotuned
    GROUP_M: tl.constexpr,  # row tiles swept together for L2 reuse of weight tiles, autotuned (8)
):
    # Row tiles are numbered modality by modality: modality j owns cdiv(count_j, BLOCK_M) of them.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M) + M - 1  # an upper bound on the row tiles of every modality together
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_pid_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    # Find the modality of row tile pid_m: the number of modalities whose tiles all come before it.
    m = 0
    tiles_before = 0  # row tiles of the modalities before m
    tile_end = 0
    group_start = tl.load(OFFSETS)
    for j in range(M):
        group_end = tl.load(OFFSETS + j + 1)
        tile_end += tl.cdiv(group_end - tl.load(OFFSETS + j), BLOCK_M)
        past = pid_m >= tile_end
        m += past.to(tl.int32)
        tiles_before = tl.where(past, tile_end, tiles_before)
        group_start = tl.where(past, group_end, group_start)
    if m >= M:  # past the last modality's tiles: the grid is sized for the worst case
        return
    group_end = tl.load(OFFSETS + m + 1)

    positions = group_start + (pid_m - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = positions < group_end
    rows = tl.load(PERM + positions, mask=row_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = X + rows[:, None] * stride_x_t + offs_k[None, :] * stride_x_k  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + m.to(tl.int64) * stride_w_m + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_x_k
        w_ptrs += BLOCK_K * stride_w_k

    if HAS_BIAS:
        bias = tl.load(B + m * stride_b_m + offs_n * stride_b_n, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = Y + rows[:, None] * stride_y_t + offs_n[None, :] * stride_y_n
    tl.store(y_ptrs, cast(acc, Y.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(x, perm, offsets, w, w_strides, bias, N, M):
    """y[t] = w[m_t] @ x[t] (+ bias[m_t]) with w addressed as [M, N, K] through ``w_strides``."""
    T, K = x.shape
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    b = bias if bias is not None else w
    b_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)

    def grid(meta):
        return ((triton.cdiv(T, meta["BLOCK_M"]) + M - 1) * triton.cdiv(N, meta["BLOCK_N"]),)

    _routed_linear_kernel[grid](
        x, w, b, y, perm, offsets, T, N, K, M, _rows_bucket(T),
        x.stride(0), x.stride(1), *w_strides, *b_strides, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y


def routed_linear_fwd(
    x: torch.Tensor, modality: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y_t = weight[m_t] @ x_t (+ bias[m_t]). x [T, K]; modality [T] int64; weight [M, N, K]; bias [M, N].

    Returns y [T, N] in x.dtype. A grouped GEMM: no row is multiplied by a weight it does not use, and a
    batch of one modality (every decode step) runs a single dense GEMM's tiles.
    """
    T = x.shape[0]
    M, N, _ = weight.shape
    if T == 0:
        return torch.empty(T, N, dtype=x.dtype, device=x.device)
    perm, offsets = _route_rows(modality, M)
    return _grouped_gemm(x, perm, offsets, weight, weight.stride(), bias, N, M)


# ----------------------------------------------------------------------------------------------------
# Weight and bias gradients
# ----------------------------------------------------------------------------------------------------

def _dweight_configs(elem: int) -> list[triton.Config]:
    """Weight-gradient configs for inputs of ``elem`` bytes: output tiles of 64 to 128 squared, reducing
    128 bytes of rows per step (64 rows in fp16 / bf16, 32 in fp32). As in _routed_configs, fp32 takes 8
    warps from 64 x 64 tiles on and skips the 128 x 128 tile."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_T": 128 // elem}, num_warps=warps, num_stages=3)
        for bn, bk in itertools.product((64, 128), (64, 128))
        for warps in [8 if bn * bk >= _EIGHT_WARP_TILE[elem] else 4]
        if elem == 2 or bn * bk <= 128 * 64
    ]


_DWEIGHT_CONFIGS = {elem: _dweight_configs(elem) for elem in (2, 4)}


def _prune_dweight(configs, named_args, **kwargs):
    """This dtype's configs; the first of them only under the interpreter."""
    own = [c for c in configs if c in _DWEIGHT_CONFIGS[named_args["X"].element_size()]]
    return own[:1] if triton.knobs.runtime.interpret else own


@triton.autotune(
    configs=_DWEIGHT_CONFIGS[2] + _DWEIGHT_CONFIGS[4],
    key=["N", "K"],
    prune_configs_by={"early_config_prune": _prune_dweight},
)
@triton.jit
def _routed_linear_dweight_kernel(
    DY,  # [T, N] gradient of y
    X,  # [T, K] forward input
    PERM,  # [T] int32 rows in stable modality order
    OFFSETS,  # [M + 1] int32 modality m owns positions [OFFSETS[m], OFFSETS[m + 1]) of PERM
    DW,  # [M, N, K] fp32 out, written when NEED_DWEIGHT (else DB, never written)
    DB,  # [M, N] fp32 out, written when HAS_BIAS (else DW, never written)
    N,
    K,
    stride_dy_t,
    stride_dy_n,
    stride_x_t,
    stride_x_k,
    stride_dw_m,
    stride_dw_n,
    stride_dw_k,
    stride_db_m,
    stride_db_n,
    NEED_DWEIGHT: tl.constexpr,  # the caller wants dweight (else only dbias: the grid has one K tile)
    HAS_BIAS: tl.constexpr,  # the forward had a bias: write dbias from the programs of the first K tile
    BLOCK_N: tl.constexpr,  # autotuned
    BLOCK_K: tl.constexpr,  # autotuned
    BLOCK_T: tl.constexpr,  # rows reduced per step, autotuned
):
    # dweight[m][n, k] = sum over rows t of modality m of dy[t, n] * x[t, k]; dbias[m][n] = sum of dy[t, n].
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    start = tl.load(OFFSETS + m)
    end = tl.load(OFFSETS + m + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    offs_t = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        t_mask = t + offs_t < end
        rows = tl.load(PERM + t + offs_t, mask=t_mask, other=0).to(tl.int64)
        dy = tl.load(
            DY + rows[:, None] * stride_dy_t + offs_n[None, :] * stride_dy_n,
            mask=t_mask[:, None] & n_mask[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_N]  # fmt: skip
        if NEED_DWEIGHT:
            x = tl.load(
                X + rows[:, None] * stride_x_t + offs_k[None, :] * stride_x_k,
                mask=t_mask[:, None] & k_mask[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_K]  # fmt: skip
            acc = dot(tl.trans(dy), x, acc)
        if HAS_BIAS:
            db += tl.sum(dy.to(tl.float32), axis=0)

    if NEED_DWEIGHT:
        dw_ptrs = DW + m * stride_dw_m + offs_n[:, None] * stride_dw_n + offs_k[None, :] * stride_dw_k
        tl.store(dw_ptrs, acc, mask=n_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB + m * stride_db_m + offs_n * stride_db_n, db, mask=n_mask)


def routed_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    modality: torch.Tensor,
    weight: torch.Tensor,
    bias_present: bool,
    need_dx: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``routed_linear_fwd``. dy [T, N]; x [T, K]; weight [M, N, K].

    Returns (dx [T, K] x.dtype or None, dweight [M, N, K] fp32 or None, dbias [M, N] fp32 or None): dx when
    need_dx, dweight when need_dweight, dbias when bias_present.
    """
    T, K = x.shape
    M, N, _ = weight.shape
    device = x.device
    dx = torch.empty_like(x) if need_dx and T == 0 else None
    # Every element of dweight and dbias is written below (an empty modality gets zeros) once T > 0.
    new = torch.zeros if T == 0 else torch.empty
    dweight = new(M, N, K, dtype=torch.float32, device=device) if need_dweight else None
    dbias = new(M, N, dtype=torch.float32, device=device) if bias_present else None
    if T == 0 or not (need_dx or need_dweight or bias_present):
        return dx, dweight, dbias
    perm, offsets = _route_rows(modality, M)

    if need_dx:
        w_t = (weight.stride(0), weight.stride(2), weight.stride(1))  # weight^T as [M, K, N], no copy
        dx = _grouped_gemm(dy, perm, offsets, weight, w_t, None, K, M)  # dy [T, N] as the input rows

    if (need_dweight and N * K > 0) or (bias_present and N > 0):
        dw = dweight if need_dweight else dbias
        db = dbias if bias_present else dw
        dw_strides = dweight.stride() if need_dweight else (0, 0, 0)
        db_strides = dbias.stride() if bias_present else (0, 0)

        def grid(meta):
            k_tiles = max(triton.cdiv(K, meta["BLOCK_K"]), 1) if need_dweight else 1
            return (triton.cdiv(N, meta["BLOCK_N"]), k_tiles, M)

        _routed_linear_dweight_kernel[grid](
            dy, x, perm, offsets, dw, db, N, K,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *dw_strides, *db_strides,
            NEED_DWEIGHT=need_dweight, HAS_BIAS=bias_present,
        )  # fmt: skip
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------


def _routed_aot_configs() -> list[AotConfig]:
    kernel = _routed_linear_kernel.fn
    # The two launches: forward (weight [M, N, K], unit stride along K, with bias: the heavier variant of
    # the two the forward uses) and dx (weight^T through strides: unit stride along N, no bias). Unit strides
    # are constexpr 1, as the JIT specializes them.
    variants = {
        "fwd": ({"HAS_BIAS": True, "stride_w_k": 1, "stride_b_n": 1}),
        "dx": ({"HAS_BIAS": False, "stride_w_n": 1}),
    }
    configs = []
    for (torch_dtype, dtype), (variant, flags) in itertools.product(TRITON_DTYPE.items(), variants.items()):
        for cfg in _ROUTED_CONFIGS[torch_dtype.itemsize]:
            constexprs = {"stride_x_k": 1, "stride_y_n": 1, **flags, **cfg.kwargs}
            pointers = {name: f"*{dtype}" for name in ("X", "W", "B", "Y")}
            pointers |= {"PERM": "*i32", "OFFSETS": "*i32"}
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            label = f"{dtype} {variant} {tile} w{cfg.num_warps} s{cfg.num_stages}"
            signature = aot_signature(kernel, pointers, constexprs)
            aligned = ("N", "K", "stride*")
            configs.append(AotConfig(label, signature, constexprs, cfg.num_warps, cfg.num_stages, aligned))
    return configs


def _dweight_aot_configs() -> list[AotConfig]:
    kernel = _routed_linear_dweight_kernel.fn
    configs = []
    for torch_dtype, dtype in TRITON_DTYPE.items():
        pointers = {"DY": f"*{dtype}", "X": f"*{dtype}", "PERM": "*i32", "OFFSETS": "*i32"}
        pointers |= {"DW": "*fp32", "DB": "*fp32"}
        unit = {"stride_dy_n": 1, "stride_x_k": 1, "stride_dw_k": 1, "stride_db_n": 1}
        dw_configs = _DWEIGHT_CONFIGS[torch_dtype.itemsize]
        # dweight with dbias (the heavier of the two dweight variants) for every config; dbias alone (no
        # dot: a column sum) for the first.
        for cfg, need_dw in [(c, True) for c in dw_configs] + [(dw_configs[0], False)]:
            constexprs = {"NEED_DWEIGHT": need_dw, "HAS_BIAS": True, **unit, **cfg.kwargs}
            tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_N", "BLOCK_K", "BLOCK_T"))
            outputs = "dweight+dbias" if need_dw else "dbias"
            label = f"{dtype} {outputs} {tile} w{cfg.num_warps} s{cfg.num_stages}"
            signature = aot_signature(kernel, pointers, constexprs)
            aligned = ("N", "K", "stride*")
            configs.append(AotConfig(label, signature, constexprs, cfg.num_warps, cfg.num_stages, aligned))
    return configs


_ROUTE_CONSTEXPRS = {"BLOCK": _ROUTE_BLOCK, "stride_mod_t": 1}
register_aot(
    _route_rows_kernel,
    [
        AotConfig(
            f"BLOCK={_ROUTE_BLOCK}",
            aot_signature(
                _route_rows_kernel, {"MODALITY": "*i64", "PERM": "*i32", "OFFSETS": "*i32"}, _ROUTE_CONSTEXPRS
            ),
            _ROUTE_CONSTEXPRS,
            num_warps=_ROUTE_WARPS,
            num_stages=1,
        )
    ],
)
register_aot(_routed_linear_kernel.fn, _routed_aot_configs())
register_aot(_routed_linear_dweight_kernel.fn, _dweight_aot_configs())
