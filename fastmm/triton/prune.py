"""Triton kernels of the `prune` family: attention importance from the rows' log-sum-exp, and token compaction.

Semantics: ``fastmm.reference.prune`` (its kernel-interface section). Inputs arrive validated and contiguous from
``fastmm.ops.prune``. Nothing here syncs the host, so every launcher can be captured in a CUDA graph.

attention_importance: one program per (block of BLOCK_N score columns, b), so every output is written once by
one program, in a fixed order (no atomics: deterministic). The program gathers its columns' keys through
span_index, one [BLOCK_D, BLOCK_N] tile per kv head, and for the query heads of that head's GQA group and the
rows, in tiles of BLOCK_R, computes p = exp2(q.k * scale * log2(e) - lse * log2(e)) with tl.dot, masked by each
row's key range, into a [BLOCK_R, BLOCK_N] fp32 accumulator that is summed over its rows once at the end. A row
whose lse is -inf (it attended nothing) shifts by +inf instead, so its probabilities are 0, never NaN or inf.

compact_tokens, two launches: a scan, one program per row, walks keep in blocks (tl.cumsum plus a running count)
and writes each kept token's index to its slot of ``source``, -1 to the slots past the count, and the count
(at most the capacity: a row keeping more keeps its first ``capacity`` tokens, and no store leaves the buffer).
Then a gather over (slot block, b, hidden block) copies hidden and positions by source, zeros past the count.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastmm.reference import prune as reference
from fastmm.triton._attention_blocks import _BLOCK_DS, _LOG2E, _Launch, _block_d, _too_wide
from fastmm.triton._shared import TRITON_DTYPE, aot_signature, dot
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["attention_importance_fwd", "compact_tokens_fwd"]

# ----------------------------------------------------------------------------------------------------
# attention_importance
# ----------------------------------------------------------------------------------------------------

# Tiles per (element bytes, BLOCK_D), spill-free on sm_80 and sm_90, for any R and for R = 1 (FastV's one row,
# which the JIT compiles as a variant of its own). Few columns per program: at real sizes (n ~ 576 columns, B 1
# to 4) the column blocks are the only parallelism, so narrow blocks keep more SMs busy; the key tile is reused
# across the whole GQA group and every row, so narrowness costs only re-reads of q, which stay in L2. fp16 / bf16
# take rows 32 at a time (64-row tiles left ptxas spilling a loop value in the R = 1 variant on sm_80); a single
# row's padding is tensor-core work only, its loads are masked. fp32 runs tf32x3 (_shared.dot), which holds both
# TF32 halves of each operand in registers with the whole key tile in every warp: 16 x 16 at BLOCK_D = 128
# already takes about 225 registers, 16 x 32 over 8 warps about 170 (over 4 warps its R = 1 variant spills on
# sm_90). The fp32 tiles run unpipelined: two stages spill at BLOCK_D = 128.
_IMPORTANCE_LAUNCH = {
    (2, 64): _Launch(block_m=32, block_n=16, num_warps=4, num_stages=2),
    (2, 128): _Launch(block_m=32, block_n=16, num_warps=4, num_stages=2),
    (4, 64): _Launch(block_m=32, block_n=16, num_warps=4, num_stages=1),
    (4, 128): _Launch(block_m=16, block_n=32, num_warps=8, num_stages=1),
}


@triton.jit
def _attention_importance_kernel(
    Q,  # [B, Hq, R, d] the rated rows' queries
    K,  # [B, Hkv, S, d]
    ROW_START,  # [B, R] int32 first key of each row's range
    ROW_END,  # [B, R] int32 end (exclusive) of each row's range; start == end: a padding row
    LSE,  # [B, Hq, R] fp32 natural-log units; -inf for a row that attended nothing
    SPAN_INDEX,  # [B, n] int32 key of each score column, -1 for a padding column
    OUT,  # [B, n] fp32 out: summed over heads and rows
    Hq,
    Hkv,
    R,
    S,
    n,
    head_dim,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_R: tl.constexpr,  # rows per tile (tl.dot's M)
    BLOCK_N: tl.constexpr,  # score columns per program
    BLOCK_D: tl.constexpr,  # padded head dim
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1).to(tl.int64)
    col_mask = cols < n
    key = tl.load(SPAN_INDEX + b * n + cols, mask=col_mask, other=-1)
    # Keys past S cannot come from validated spans; excluding them keeps every load inside k regardless.
    key_valid = (key >= 0) & (key < S)
    key_at = tl.where(key_valid, key, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    group = Hq // Hkv

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for kv in range(Hkv):
        # The columns' keys of this kv head, transposed for the dot: [BLOCK_D, BLOCK_N], zero where padding.
        k_t = tl.load(
            K + ((b * Hkv + kv) * S + key_at[None, :]) * head_dim + offs_d[:, None],
            mask=d_mask[:, None] & key_valid[None, :], other=0.0,
        )  # fmt: skip
        # One flat loop over (row tile, query head of the group): nested loops made ptxas spill loop state.
        for step in range(tl.cdiv(R, BLOCK_R) * group):
            rows = (step // group) * BLOCK_R + offs_r
            h = kv * group + step % group
            row_mask = rows < R
            # Rows past R get the empty range [0, 0), like padding rows: they add nothing.
            start = tl.load(ROW_START + b * R + rows, mask=row_mask, other=0)
            end = tl.load(ROW_END + b * R + rows, mask=row_mask, other=0)
            inside = (key[None, :] >= start[:, None]) & (key[None, :] < end[:, None]) & key_valid[None, :]
            head_rows = (b * Hq + h) * R + rows  # [BLOCK_R] index of (b, h, row) in q's rows and in lse
            q = tl.load(
                Q + head_rows[:, None] * head_dim + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
            )
            lse = tl.load(LSE + head_rows, mask=row_mask, other=float("inf"))
            # exp(x - (-inf)) is inf: shift such a row by +inf instead, so a row that attended nothing gives 0.
            shift = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)
            logits = dot(q, k_t, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)) * qk_scale - shift[:, None]
            acc += tl.where(inside, tl.math.exp2(logits), 0.0)
    tl.store(OUT + b * n + cols, tl.sum(acc, axis=0), mask=col_mask)


def attention_importance_fwd(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    row_start: torch.Tensor,
    row_end: torch.Tensor,
    lse: torch.Tensor,
    span_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """out[b, c] = sum over heads h and rows r whose range holds key j = span_index[b, c] of exp(q_rows[b, h, r] .
    k[b, h // G, j] * scale - lse[b, h, r]); 0 for a padding column (j = -1). q_rows [B, Hq, R, d]; k
    [B, Hkv, S, d]; row_start, row_end [B, R] int32; lse [B, Hq, R] fp32; span_index [B, n] int32. Returns
    [B, n] fp32."""
    B, Hq, R, d = q_rows.shape
    Hkv, S = k.shape[1], k.shape[2]
    n = span_index.shape[1]
    if _too_wide("attention_importance", d):
        return reference.attention_importance_fwd(q_rows, k, row_start, row_end, lse, span_index, scale)
    out = torch.empty(B, n, dtype=torch.float32, device=q_rows.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(d)
    launch = _IMPORTANCE_LAUNCH[q_rows.element_size(), block_d]
    grid = (triton.cdiv(n, launch.block_n), B)
    _attention_importance_kernel[grid](
        q_rows, k, row_start, row_end, lse, span_index, out, Hq, Hkv, R, S, n, d, scale * _LOG2E,
        BLOCK_R=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# compact_tokens
# ----------------------------------------------------------------------------------------------------

_SCAN_BLOCK = 1024  # tokens per step of a row's scan
_SCAN_WARPS = 4
# Gather tiles: BLOCK_S slots x BLOCK_H hidden features, contiguous along the features (16 elements per thread
# at 4 warps). A plain copy: no loop, so nothing to pipeline.
_GATHER_BLOCK_S = 16
_GATHER_BLOCK_H = 128
_GATHER_WARPS = 4


@triton.jit
def _compact_scan_kernel(
    KEEP,  # [B, L] bool read as uint8
    SOURCE,  # [B, capacity] int64 out: the token each slot takes, -1 past the count
    COUNT,  # [B] int32 out: min(kept tokens, capacity)
    L,
    capacity,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    kept = 0
    for start in range(0, L, BLOCK_L):
        tokens = start + offs
        flag = (tl.load(KEEP + b * L + tokens, mask=tokens < L, other=0) != 0).to(tl.int32)
        slot = kept + tl.cumsum(flag, axis=0) - 1
        tl.store(SOURCE + b * capacity + slot, tokens.to(tl.int64), mask=(flag != 0) & (slot < capacity))
        kept += tl.sum(flag, axis=0)
    count = tl.minimum(kept, capacity)
    tl.store(COUNT + b, count)
    # The slots past the count: disjoint from those written above, so the order of the stores does not matter.
    for start in range(0, capacity, BLOCK_L):
        slots = start + offs
        tl.store(SOURCE + b * capacity + slots, tl.full((BLOCK_L,), -1, tl.int64),
                 mask=(slots >= count) & (slots < capacity))  # fmt: skip


@triton.jit
def _compact_gather_kernel(
    HIDDEN,  # [B, L, D]
    POSITIONS,  # [B, L] int64
    SOURCE,  # [B, capacity] int64 from the scan
    HIDDEN_OUT,  # [B, capacity, D] out, hidden's dtype: zeros past the count
    POSITIONS_OUT,  # [B, capacity] int64 out: 0 past the count
    L,
    D,
    capacity,
    BLOCK_S: tl.constexpr,  # slots per program
    BLOCK_H: tl.constexpr,  # hidden features per program
):
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1).to(tl.int64)
    h_block = tl.program_id(2)
    feats = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    slot_mask = slots < capacity
    feat_mask = feats < D
    src = tl.load(SOURCE + b * capacity + slots, mask=slot_mask, other=-1)
    taken = (src >= 0) & (src < L)
    token = b * L + tl.where(taken, src, 0)
    h = tl.load(HIDDEN + token[:, None] * D + feats[None, :], mask=taken[:, None] & feat_mask[None, :], other=0.0)
    out_rows = b * capacity + slots
    tl.store(HIDDEN_OUT + out_rows[:, None] * D + feats[None, :], h, mask=slot_mask[:, None] & feat_mask[None, :])
    if h_block == 0:
        tl.store(POSITIONS_OUT + out_rows, tl.load(POSITIONS + token, mask=taken, other=0), mask=slot_mask)


def compact_tokens_fwd(
    hidden: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row b's kept tokens, in order, in slots [0, count[b]) of ``capacity``. hidden [B, L, D] float; positions
    [B, L] int64; keep [B, L] bool. Returns (hidden [B, capacity, D], positions [B, capacity] int64, count [B]
    int32, source [B, capacity] int64), zeros / 0 / -1 past the count."""
    B, L, D = hidden.shape
    device = hidden.device
    hidden_out = torch.empty(B, capacity, D, dtype=hidden.dtype, device=device)
    positions_out = torch.empty(B, capacity, dtype=torch.int64, device=device)
    count = torch.empty(B, dtype=torch.int32, device=device)
    source = torch.empty(B, capacity, dtype=torch.int64, device=device)
    if B == 0:
        return hidden_out, positions_out, count, source
    _compact_scan_kernel[(B,)](
        keep.view(torch.uint8), source, count, L, capacity,
        BLOCK_L=_SCAN_BLOCK, num_warps=_SCAN_WARPS, num_stages=1,
    )  # fmt: skip
    if capacity:
        # At least one feature block even for D = 0: its programs write the positions.
        grid = (triton.cdiv(capacity, _GATHER_BLOCK_S), B, max(triton.cdiv(D, _GATHER_BLOCK_H), 1))
        _compact_gather_kernel[grid](
            hidden, positions, source, hidden_out, positions_out, L, D, capacity,
            BLOCK_S=_GATHER_BLOCK_S, BLOCK_H=_GATHER_BLOCK_H, num_warps=_GATHER_WARPS, num_stages=1,
        )  # fmt: skip
    return hidden_out, positions_out, count, source


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

# Integer arguments divisible by 16 at real sizes: the head dim (128) and the score columns (576 per image, 24 x
# 24 tokens) of attention_importance; the hidden size (4096) of compact_tokens. Row, key and token counts and
# capacities are arbitrary.


def _importance_aot_configs() -> list[AotConfig]:
    # FastV rates with one row: the JIT specializes R = 1 into a constant, a variant of its own.
    configs = []
    for (torch_dtype, dtype), block_d, rows in itertools.product(TRITON_DTYPE.items(), _BLOCK_DS, ({}, {"R": 1})):
        launch = _IMPORTANCE_LAUNCH[torch_dtype.itemsize, block_d]
        constexprs = {"BLOCK_R": launch.block_m, "BLOCK_N": launch.block_n, "BLOCK_D": block_d, **rows}
        pointers = {"Q": f"*{dtype}", "K": f"*{dtype}", "ROW_START": "*i32", "ROW_END": "*i32", "LSE": "*fp32",
                    "SPAN_INDEX": "*i32", "OUT": "*fp32"}  # fmt: skip
        signature = aot_signature(_attention_importance_kernel, pointers, constexprs, floats=("qk_scale",))
        label = f"{dtype} {launch.block_m}x{launch.block_n}x{block_d} w{launch.num_warps} s{launch.num_stages}"
        label += " R=1" if rows else ""
        configs.append(AotConfig(label, signature, constexprs, launch.num_warps, launch.num_stages,
                                 ("n", "head_dim")))  # fmt: skip
    return configs


def _scan_aot_configs() -> list[AotConfig]:
    constexprs = {"BLOCK_L": _SCAN_BLOCK}
    pointers = {"KEEP": "*u8", "SOURCE": "*i64", "COUNT": "*i32"}
    signature = aot_signature(_compact_scan_kernel, pointers, constexprs)
    return [AotConfig(f"BLOCK_L={_SCAN_BLOCK} w{_SCAN_WARPS} s1", signature, constexprs, _SCAN_WARPS, 1)]


def _gather_aot_configs() -> list[AotConfig]:
    constexprs = {"BLOCK_S": _GATHER_BLOCK_S, "BLOCK_H": _GATHER_BLOCK_H}
    configs = []
    for dtype in TRITON_DTYPE.values():
        pointers = {"HIDDEN": f"*{dtype}", "HIDDEN_OUT": f"*{dtype}", "POSITIONS": "*i64", "SOURCE": "*i64",
                    "POSITIONS_OUT": "*i64"}  # fmt: skip
        signature = aot_signature(_compact_gather_kernel, pointers, constexprs)
        label = f"{dtype} {_GATHER_BLOCK_S}x{_GATHER_BLOCK_H} w{_GATHER_WARPS} s1"
        configs.append(AotConfig(label, signature, constexprs, _GATHER_WARPS, 1, ("D",)))
    return configs


register_aot(_attention_importance_kernel, _importance_aot_configs())
register_aot(_compact_scan_kernel, _scan_aot_configs())
register_aot(_compact_gather_kernel, _gather_aot_configs())
