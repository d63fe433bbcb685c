"""Building blocks of the attention family's Triton kernels (fastmm.triton.span_attention and
fastmm.triton.decode_attention): the head-dim buckets, the masking arguments of a launch, the logits (scale,
softcap, key padding, bool / float masks, in log2 units for exp2), the online-softmax loop over key tiles, and
the ahead-of-time configuration helpers. Semantics: fastmm.reference.attention (its kernel-interface section).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import triton
import triton.language as tl

from fastmm import backend
from fastmm.triton._shared import TRITON_DTYPE, aot_signature, cast, dot
from fastmm.triton.aot import AotConfig

# Widest head the kernels hold in registers (LLaMA / Chameleon / Emu3: 128); wider heads run the reference.
MAX_HEAD_DIM = 128
_BLOCK_DS = (64, 128)  # narrower heads pad to 64: real models use 64 to 128, so two variants cover them
_LOG2E = math.log2(math.e)

# MASK_KIND, the constexpr saying what the optional [B, Lq, S] mask is: none, bool (read as uint8) or float32.
_MASK_NONE = tl.constexpr(0)
_MASK_BOOL = tl.constexpr(1)
_MASK_FLOAT = tl.constexpr(2)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Tile sizes, warps and pipeline stages of one (dtype width, BLOCK_D) bucket."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), _BLOCK_DS[0])


def _too_wide(op: str, d: int) -> bool:
    """True (after one logged warning) when heads of d elements must go to the reference implementation."""
    if d <= MAX_HEAD_DIM:
        return False
    backend.warn_fallback(op, "triton", "reference", f"head dim {d} exceeds the compiled limit {MAX_HEAD_DIM}")
    return True


@dataclasses.dataclass(frozen=True)
class _Masking:
    """The optional masking arguments as a launch passes them: pointers (an absent one is q, never read), their
    strides and the constexprs that select the code reading them. Bool tensors are read as uint8.

    A kernel takes key padding or a mask, never both: given both, the padding is folded into the mask (one
    [B, Lq, S] pass), so that every launch is one of the variants compiled ahead of time (_MASKING_VARIANTS).
    fastmm's integrations never pass both."""

    key_keep: torch.Tensor  # [B, S] uint8
    mask: torch.Tensor  # [B, Lq, S] uint8 or fp32
    stride_keep_b: int
    stride_mask_b: int
    stride_mask_q: int
    cap_in: float  # scale / softcap: the tanh's argument is q.k * cap_in
    cap_out: float  # softcap * log2(e): logits in log2 units are tanh * cap_out
    constexprs: dict  # HAS_KEY_KEEP, MASK_KIND, SOFTCAP

    @staticmethod
    def of(q: torch.Tensor, key_keep: torch.Tensor | None, mask: torch.Tensor | None, scale: float,
           softcap: float) -> "_Masking":  # fmt: skip
        if key_keep is not None and mask is not None:
            kept = key_keep[:, None, :]
            mask = mask & kept if mask.dtype == torch.bool else mask.masked_fill(~kept, float("-inf"))
            key_keep = None
        keep = q if key_keep is None else key_keep.view(torch.uint8)
        if mask is None:
            mask_kind, mask_arg = _MASK_NONE.value, q
        elif mask.dtype == torch.bool:
            mask_kind, mask_arg = _MASK_BOOL.value, mask.view(torch.uint8)
        else:
            mask_kind, mask_arg = _MASK_FLOAT.value, mask
        return _Masking(
            keep, mask_arg, keep.stride(0) if key_keep is not None else 0,
            *(mask_arg.stride()[:2] if mask is not None else (0, 0)),
            scale / softcap if softcap else 0.0, softcap * _LOG2E,
            {"HAS_KEY_KEEP": key_keep is not None, "MASK_KIND": mask_kind, "SOFTCAP": bool(softcap)},
        )  # fmt: skip


def _tiles(plain: dict, masked: dict, itemsize: int, block_d: int, masking: dict) -> _Launch | None:
    """The tiles of a launch with the ``masking`` constexprs: from ``masked`` when any is set (key_keep, a mask or
    a softcap is read), else from ``plain``; None where ``masked`` has no spill-free tiles for the bucket."""
    return (masked if any(masking.values()) else plain).get((itemsize, block_d))


# ----------------------------------------------------------------------------------------------------
# Logits and the online-softmax loop of the forward and decode kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _key_mask(keys, key_end, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys of the tile that may be read: in a masked run the last tile can pass the keys (and the tensor)."""
    if MASKED:
        return keys < key_end
    return tl.full((BLOCK_N,), 1, tl.int1)


@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter cannot run libdevice's), through e = exp(-2|x|) in (0, 1]: no overflow."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # -2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cap(qk, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """(logits in log2 units, tanh) from fp32 q.k: q.k * scale, or with SOFTCAP softcap * tanh(q.k * scale /
    softcap). The backward's chain rule needs the tanh (d logit / d (q.k * scale) = 1 - tanh^2); without
    SOFTCAP the second value is q.k and goes unused."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        return t * cap_out, t
    return qk * qk_scale, qk


@triton.jit
def _apply_masks(scores, keep_ptrs, mask_ptrs, key_valid, pair_valid, HAS_KEY_KEEP: tl.constexpr,
                 MASK_KIND: tl.constexpr):  # fmt: skip
    """key_keep and the mask on a tile of logits in log2 units: -inf where key_keep or a bool mask drops the key,
    plus a float mask (natural units, hence the log2(e)). The pointers and validity masks broadcast to the tile,
    queries x keys or keys x queries alike."""
    if HAS_KEY_KEEP:
        scores = tl.where(tl.load(keep_ptrs, mask=key_valid, other=0) != 0, scores, float("-inf"))
    if MASK_KIND == _MASK_BOOL:
        scores = tl.where(tl.load(mask_ptrs, mask=pair_valid, other=0) != 0, scores, float("-inf"))
    if MASK_KIND == _MASK_FLOAT:
        scores += tl.load(mask_ptrs, mask=pair_valid, other=0.0) * 1.4426950408889634  # log2(e)
    return scores


@triton.jit
def _logits(
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype
    k_t,  # [BLOCK_D, BLOCK_N] keys, transposed
    keys,  # [BLOCK_N] key indices
    key_valid,  # [BLOCK_N] keys that exist
    q_start,  # [BLOCK_M] int32 first key of each query's range
    q_end,  # [BLOCK_M] int32 end (exclusive) of each query's range
    row_mask,  # [BLOCK_M] queries that exist
    keep_row,  # pointer to key_keep[b, 0] (read when HAS_KEY_KEEP)
    mask_rows,  # [BLOCK_M, 1] pointers to mask[b, query, 0] (read when MASK_KIND is not none)
    qk_scale,
    cap_in,
    cap_out,
    BLOCK_M: tl.constexpr,
    IN_RANGE: tl.constexpr,  # mask each query's range (a partial tile)
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """([BLOCK_M, BLOCK_N] fp32 logits in log2 units, -inf where the query may not attend the key; the tanh
    of _cap)."""
    qk = dot(q, k_t, tl.zeros((BLOCK_M, k_t.shape[1]), dtype=tl.float32))
    scores, t = _cap(qk, qk_scale, cap_in, cap_out, SOFTCAP)
    if IN_RANGE:
        in_range = (keys[None, :] >= q_start[:, None]) & (keys[None, :] < q_end[:, None])
        scores = tl.where(in_range, scores, float("-inf"))
    scores = _apply_masks(
        scores, keep_row + keys[None, :], mask_rows + keys[None, :], key_valid[None, :],
        row_mask[:, None] & key_valid[None, :], HAS_KEY_KEEP, MASK_KIND,
    )  # fmt: skip
    return scores, t


@triton.jit
def _softmax_step(scores, m_i, l_i, GUARD: tl.constexpr):
    """One tile of the online softmax in log2 units: (p = exp2(scores - m_new), alpha = exp2(m_i - m_new), m_new,
    l_new). GUARD: some row of the tile may hold only -inf logits; a row still at m = -inf then shifts by 0, so
    its p and alpha are 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_shift = m_new
    if GUARD:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_key_tiles(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p @ v (unnormalized)
    m_i,  # [BLOCK_M] fp32 running max of the logits, log2 units (-inf while a row has seen no key)
    l_i,  # [BLOCK_M] fp32 running sum of exp2(logit - m_i)
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype (zero-padded rows and head dims)
    K,  # [keys, d] this kv head's keys (pointer to key 0)
    V,  # [keys, d] this kv head's values
    stride_k_key,
    stride_v_key,
    tile_lo,  # first key of the first tile (a multiple of BLOCK_N)
    tile_hi,  # the loop stops before this key
    key_end,  # keys at or past it are not read (no query attends them)
    q_start,  # [BLOCK_M] int32 first key of each query's range
    q_end,  # [BLOCK_M] int32 end (exclusive) of each query's range
    row_mask,  # [BLOCK_M] queries that exist
    keep_row,  # pointer to key_keep[b, 0]
    mask_rows,  # [BLOCK_M, 1] pointers to mask[b, query, 0]
    d_mask,  # [BLOCK_D] head dims that exist
    qk_scale,  # softmax scale * log2(e)
    cap_in,  # scale / softcap
    cap_out,  # softcap * log2(e)
    BLOCK_M: tl.constexpr,  # query rows
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # padded head dim
    MASKED: tl.constexpr,  # some tile of [tile_lo, tile_hi) is not inside every query's range
    HAS_KEY_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        keys = start_n + offs_n
        key_mask = _key_mask(keys, key_end, BLOCK_N, MASKED)
        k_t = tl.load(
            K + offs_d[:, None] + keys[None, :] * stride_k_key, mask=d_mask[:, None] & key_mask[None, :], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        scores, _ = _logits(
            q, k_t, keys, key_mask, q_start, q_end, row_mask, keep_row, mask_rows, qk_scale, cap_in, cap_out,
            BLOCK_M, MASKED, HAS_KEY_KEEP, MASK_KIND, SOFTCAP,
        )  # fmt: skip
        p, alpha, m_i, l_i = _softmax_step(scores, m_i, l_i, MASKED or (HAS_KEY_KEEP or MASK_KIND != _MASK_NONE))
        v = tl.load(
            V + keys[:, None] * stride_v_key + offs_d[None, :], mask=key_mask[:, None] & d_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None])
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every launch configuration the launchers above can choose
# ----------------------------------------------------------------------------------------------------

# Integer arguments divisible by 16 at real sizes (d = 64 .. 128): every stride that is a multiple of d, the
# head dim, and the decode split size (a multiple of BLOCK_N). Strides that are multiples of Lq, S or of the
# split count only (key ranges, key_keep, masks, log-sum-exps) are not, and neither are head or query counts.
_ALIGNED = {
    "_span_attention_fwd_kernel": ("stride_q_*", "stride_k_*", "stride_v_*", "stride_o_*", "head_dim"),
    "_span_attention_bwd_dq_kernel": ("stride_q_*", "stride_k_*", "stride_v_*", "head_dim"),
    "_span_attention_bwd_dkdv_kernel": ("stride_q_*", "stride_k_*", "head_dim"),
    "_decode_attention_split_kernel": (
        "stride_q_*", "stride_k_*", "stride_v_*", "stride_op_*", "head_dim", "split_size",
    ),
    "_decode_attention_merge_kernel": ("stride_op_*", "stride_o_row", "head_dim"),
}  # fmt: skip

# The masking variants compiled ahead of time: every one a launch can produce (_Masking never pairs key_keep
# with a mask). Register allocation is not monotonic in the code (a variant with fewer loads has been seen to
# spill where a larger one did not), so no variant stands in for another.
_MASKING_VARIANTS = tuple(
    (label, {"HAS_KEY_KEEP": keep, "MASK_KIND": kind.value, "SOFTCAP": cap})
    for label, keep, kind, cap in (
        ("", False, _MASK_NONE, False), ("cap", False, _MASK_NONE, True),
        ("keep", True, _MASK_NONE, False), ("keep+cap", True, _MASK_NONE, True),
        ("bool", False, _MASK_BOOL, False), ("bool+cap", False, _MASK_BOOL, True),
        ("float", False, _MASK_FLOAT, False), ("float+cap", False, _MASK_FLOAT, True),
    )
)  # fmt: skip


def _masking_pointers(constexprs: dict, dtype: str) -> dict:
    """KEY_KEEP and MASK as a launch passes them: uint8 / fp32 when given, else q (never read)."""
    mask_kind = constexprs["MASK_KIND"]
    mask = {_MASK_NONE.value: f"*{dtype}", _MASK_BOOL.value: "*u8", _MASK_FLOAT.value: "*fp32"}[mask_kind]
    return {"KEY_KEEP": "*u8" if constexprs.get("HAS_KEY_KEEP") else f"*{dtype}", "MASK": mask}


def _aot_config(kernel, label: str, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    """AotConfig with the float arguments typed fp32 and the integers of _ALIGNED marked divisible by 16."""
    signature = aot_signature(kernel, pointers, constexprs, floats=("qk_scale", "scale", "cap_in", "cap_out"))
    return AotConfig(label, signature, constexprs, num_warps, num_stages, _ALIGNED[kernel.fn.__name__])


def _attention_aot_configs(
    kernel, launches: dict, masked_launches: dict, pointer_names: tuple[str, ...], extra: dict,
    fixed: dict | None = None, key_keep: bool = True,
) -> list[AotConfig]:  # fmt: skip
    """One config per (dtype, BLOCK_D, masking variant) with the tiles a launch picks for it (``launches`` without
    masking, ``masked_launches`` with): ``pointer_names`` in the input dtype, ``extra`` pointers as given, ``fixed``
    constexprs beside the tile sizes and masking flags; ``key_keep`` False for a kernel without key padding."""
    configs = []
    for (torch_dtype, dtype), block_d, (suffix, masking) in itertools.product(
        TRITON_DTYPE.items(), _BLOCK_DS, _MASKING_VARIANTS
    ):
        if not key_keep:
            if masking["HAS_KEY_KEEP"]:
                continue
            masking = {name: value for name, value in masking.items() if name != "HAS_KEY_KEEP"}
        launch = _tiles(launches, masked_launches, torch_dtype.itemsize, block_d, masking)
        if launch is None:  # those launches run the reference
            continue
        pointers = {name: f"*{dtype}" for name in pointer_names} | extra | _masking_pointers(masking, dtype)
        constexprs = {
            "BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n, "BLOCK_D": block_d, **(fixed or {}), **masking,
        }  # fmt: skip
        label = f"{dtype} {launch.block_m}x{launch.block_n}x{block_d} w{launch.num_warps} s{launch.num_stages}"
        label += f" {suffix}" if suffix else ""
        configs.append(_aot_config(kernel, label, pointers, constexprs, launch.num_warps, launch.num_stages))
    return configs
