"""Triton kernel of the `sampling` family: fused classifier-free-guidance sampling of image tokens.

Where the draw needs no statistic of the whole row (raw-logit guidance, no top-k / top-p) the row's ids are
split over several programs and their bests merged (_cfg_sample_split_kernel, below); otherwise one program
per output row mixes the row's G groups of logits, divides by the temperature, keeps top-k then
top-p, and draws by an exponential race, argmax (s - log E) over the kept ids. Semantics, tie rules and the RNG
(the same E for the same seed, offset, row and id in every backend): ``fastmm.reference.sampling``.

Inputs arrive validated from ``fastmm.ops.sampling``: logits [G*B, V] with unit stride along V, offset one
int64 on the device, read by the kernel. Nothing here syncs the host, so a decode step that calls it can be
captured in a CUDA graph and replayed while the caller increments offset in place.

Layout: a program loops over its row's allowed ids [lo, hi) in tiles of BLOCK_V, recomputing the guided
scores from the logits in every pass rather than storing them (the G rows stay in L2), with per-tile
reductions carried in scalars:
- log_softmax mix: two passes per group over all V (max, then sum of exp) for its shift.
- temperature 0: one pass, argmax of the guided scores, the lowest id on ties.
- top-k: the threshold is the key of the k-th largest score, found bit by bit from the top over the scores'
  order-preserving uint32 keys: 32 passes, each counting the ids whose key reaches prefix | bit and keeping
  the bit when at least k do. The result is exactly the k-th largest key, so ties with it are kept.
- top-p: one pass for the max, one for Z = sum of exp(s - max) over the kept ids, then the same 32-bit
  search for the largest key whose mass (sum of exp(s - max) over keys >= it) reaches top_p * Z. Each pass
  sums in the same fixed order with some ids masked to 0, so the mass cannot grow with the key and the search
  is exact for these sums (other backends sum in another order: only near-ties at the boundary can differ).
- the race: one pass, argmax of s - log E over the kept ids.
FP fusion is off at launch (enable_fp_fusion=False) and divisions use div_rn, so that every operation the
reference rounds to fp32 rounds the same way here: the race is bit-exact with the reference and native.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmm.reference import sampling as reference
from fastmm.triton._shared import TRITON_DTYPE, aot_signature
from fastmm.triton.aot import AotConfig, register_aot

__all__ = ["cfg_sample_fwd", "jacobi_verify_fwd"]

_ONE_BITS = tl.constexpr(reference.ONE_BITS)
_SQRT_HALF_BITS = tl.constexpr(reference.SQRT_HALF_BITS)
_LN2_HI = tl.constexpr(reference.LN2_HI)
_LN2_LO = tl.constexpr(reference.LN2_LO)
_LG1 = tl.constexpr(reference.LG1)
_LG2 = tl.constexpr(reference.LG2)
_LG3 = tl.constexpr(reference.LG3)
_LG4 = tl.constexpr(reference.LG4)
_W_MAX = tl.constexpr(reference.W_MAX)
_TWO_POW_MINUS_32 = tl.constexpr(2.0**-32)

# ----------------------------------------------------------------------------------------------------
# The RNG (reference: hash32, row_keys, exponential, log_f32)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _hash32(x):
    """lowbias32 on uint32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(seed, step, row):
    """(key1, key2): the RNG words of one row for (seed, offset)."""
    state = _hash32(seed.to(tl.uint32, bitcast=True))
    state = _hash32(state ^ (step & 0xFFFFFFFF).to(tl.uint32))
    state = _hash32(state ^ ((step >> 32) & 0xFFFFFFFF).to(tl.uint32))
    key1 = _hash32(state ^ row.to(tl.uint32))
    return key1, _hash32(key1 ^ 0x9E3779B9)


@triton.jit
def _log_f32(x):
    """FreeBSD / musl logf of positive normal x, operation for operation (reference.log_f32)."""
    bits = x.to(tl.int32, bitcast=True) + (_ONE_BITS - _SQRT_HALF_BITS)
    k = (bits >> 23) - 0x7F
    f = ((bits & 0x007FFFFF) + _SQRT_HALF_BITS).to(tl.float32, bitcast=True) - 1.0
    s = tl.math.div_rn(f, 2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * _LG3) + w * (_LG2 + w * _LG4)
    hfsq = 0.5 * f * f
    dk = k.to(tl.float32)
    return s * (hfsq + r) + dk * _LN2_LO - hfsq + f + dk * _LN2_HI


@triton.jit
def _race_noise(ids, key1, key2):
    """-log(E) for ids (int32): what the race adds to their scores (reference.race_noise)."""
    bits = _hash32(_hash32(ids.to(tl.uint32) ^ key1) ^ key2)
    w = tl.minimum(bits.to(tl.float32) + 0.5, _W_MAX) * _TWO_POW_MINUS_32
    x = -w
    u = 1.0 + x
    e = -(_log_f32(u) + (x - (u - 1.0)))  # -log1p(x), see the reference
    return -_log_f32(e)


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _ordered_keys(s):
    """uint32 keys in the order of the scores (NaN excluded); -0 shares +0's key."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _group(GROUP_ROW, ids, mask, shift, log_sum):
    """One group's logits at ids as fp32, minus its log_softmax statistics ((x - 0) - 0 == x for raw logits)."""
    return (tl.load(GROUP_ROW + ids, mask=mask, other=0.0).to(tl.float32) - shift) - log_sum


@triton.jit
def _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G: tl.constexpr):
    """Guided scores of ids divided by the temperature (reference.guided_scores, in its order of operations);
    NaN and masked lanes -inf. stats holds (max, log_sum) per group."""
    g0 = _group(ROW, ids, mask, stats[0], stats[1])
    z = g0
    if G >= 2:
        g1 = _group(ROW + group_stride, ids, mask, stats[2], stats[3])
        if G == 2:
            z = g1 + (g0 - g1) * scale0
        else:
            g2 = _group(ROW + 2 * group_stride, ids, mask, stats[4], stats[5])
            z = (g2 + (g1 - g2) * scale1) + (g0 - g1) * scale0
    z = tl.where(mask & (z == z), z, float("-inf"))  # z == z is false for NaN only
    return tl.math.div_rn(z, temperature)


@triton.jit
def _log_softmax_stats(GROUP_ROW, V, BLOCK_V: tl.constexpr):
    """(max, log of sum exp(x - max)) of one group's row over all V ids, as torch's log_softmax computes them."""
    cols = tl.arange(0, BLOCK_V)
    running = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(GROUP_ROW + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        running = tl.maximum(running, x)
    row_max = tl.max(running, axis=0)
    total = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(GROUP_ROW + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        total += tl.exp(x - row_max)
    return row_max, tl.log(tl.sum(total, axis=0))


@triton.jit
def _argmax_update(best, best_id, values, ids, hi):
    """Running (max, id): the tile's lowest id holding its max replaces the best only when strictly larger,
    so ties go to the lowest id (earlier tiles hold lower ids)."""
    tile_max = tl.max(values, axis=0)
    tile_id = tl.min(tl.where(values == tile_max, ids, hi), axis=0)
    better = tile_max > best
    return tl.where(better, tile_max, best), tl.where(better, tile_id, best_id)


# ----------------------------------------------------------------------------------------------------
# Passes over a row's allowed ids
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _count_keys(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, min_key, G: tl.constexpr,
                BLOCK_V: tl.constexpr):  # fmt: skip
    """How many allowed ids have an ordered key >= min_key."""
    count = tl.zeros((BLOCK_V,), tl.int32)
    for start in range(lo, hi, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        mask = ids < hi
        s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
        count += (mask & (_ordered_keys(s) >= min_key)).to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit
def _max_score(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, G: tl.constexpr,
               BLOCK_V: tl.constexpr):  # fmt: skip
    """The largest score of the allowed ids."""
    running = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        running = tl.maximum(running, _scores(ROW, group_stride, ids, ids < hi, stats, scale0, scale1, temperature, G))
    return tl.max(running, axis=0)


@triton.jit
def _kept_mass(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, min_key, candidate, s_max,
               G: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Sum of exp(s - s_max) over the allowed ids whose key is >= both min_key and candidate, in a fixed order
    (lane-wise over tiles, then a tree): masking more ids can only lower it."""
    total = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(lo, hi, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        mask = ids < hi
        s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
        keys = _ordered_keys(s)
        total += tl.where(mask & (keys >= min_key) & (keys >= candidate), tl.exp(s - s_max), 0.0)
    return tl.sum(total, axis=0)


# ----------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _group_stats(ROW, group_stride, V, log_softmax, G: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, log_sum) of each group's logits for mix "log_softmax"; zeros for raw logits (and absent groups)."""
    zero = tl.zeros((), tl.float32)
    stats = (zero, zero, zero, zero, zero, zero)
    if log_softmax != 0:
        max0, log_sum0 = _log_softmax_stats(ROW, V, BLOCK_V)
        max1, log_sum1 = zero, zero
        max2, log_sum2 = zero, zero
        if G >= 2:
            max1, log_sum1 = _log_softmax_stats(ROW + group_stride, V, BLOCK_V)
        if G >= 3:
            max2, log_sum2 = _log_softmax_stats(ROW + 2 * group_stride, V, BLOCK_V)
        stats = (max0, log_sum0, max1, log_sum1, max2, log_sum2)
    return stats


@triton.jit
def _kept_min_key(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, top_k, top_p, G: tl.constexpr,
                  BLOCK_V: tl.constexpr):  # fmt: skip
    """The smallest ordered key the kept set holds (kept: ordered key >= it), top-k first, then top-p: bit by bit
    from the top, 32 counting passes each."""
    min_key = tl.zeros((), tl.uint32)
    top_bit = tl.full((), 0x80000000, tl.uint32)
    if top_k > 0 and top_k < hi - lo:
        for bit in range(32):
            candidate = min_key | (top_bit >> bit)
            count = _count_keys(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, candidate, G, BLOCK_V)
            min_key = tl.where(count >= top_k, candidate, min_key)
    if top_p < 1.0:
        s_max = _max_score(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, G, BLOCK_V)
        # Z is the mass at candidate 0 (every kept id): summed exactly like the masses below.
        target = top_p * _kept_mass(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, min_key, 0, s_max,
                                    G, BLOCK_V)  # fmt: skip
        prefix = tl.zeros((), tl.uint32)
        for bit in range(32):
            candidate = prefix | (top_bit >> bit)
            mass = _kept_mass(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, min_key, candidate,
                              s_max, G, BLOCK_V)  # fmt: skip
            prefix = tl.where(mass >= target, candidate, prefix)  # a NaN Z leaves 0: keep all
        min_key = tl.maximum(min_key, prefix)
    return min_key


# Scalars that may be 1 stay runtime values: a specialization per value would recompile mid-generation.
@triton.jit(do_not_specialize=["B", "lo", "hi", "top_k", "log_softmax", "seed"])
def _cfg_sample_kernel(
    LOGITS,  # [G*B, V] logits, unit stride along V
    OFFSET,  # [1] int64 RNG offset (the decode step), read here
    OUT,  # [B] int64 out: the sampled ids
    B,
    V,
    stride_row,
    lo,  # allowed ids: [lo, hi)
    hi,
    scale0,
    scale1,
    temperature,  # 0: greedy
    top_k,  # 0: off
    top_p,  # 1.0: off
    log_softmax,  # 1: mix log-softmaxed groups (Emu3); 0: raw logits
    seed,  # int32 bit pattern of the uint32 seed
    G: tl.constexpr,  # groups: 1, 2 or 3
    BLOCK_V: tl.constexpr,  # ids per tile, set by the launcher
):
    row = tl.program_id(0)
    ROW = LOGITS + row.to(tl.int64) * stride_row
    group_stride = B.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)

    stats = _group_stats(ROW, group_stride, V, log_softmax, G, BLOCK_V)

    best = tl.full((), float("-inf"), tl.float32)
    best_id = lo
    if temperature == 0.0:
        for start in range(lo, hi, BLOCK_V):
            ids = start + cols
            mask = ids < hi
            z = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, 1.0, G)
            best, best_id = _argmax_update(best, best_id, z, ids, hi)
    else:
        min_key = _kept_min_key(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, top_k, top_p, G,
                                BLOCK_V)  # fmt: skip
        key1, key2 = _row_keys(seed, tl.load(OFFSET), row)
        for start in range(lo, hi, BLOCK_V):
            ids = start + cols
            mask = ids < hi
            s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
            kept = mask & (_ordered_keys(s) >= min_key)
            race = tl.where(kept, s + _race_noise(ids, key1, key2), float("-inf"))
            best, best_id = _argmax_update(best, best_id, race, ids, hi)
    tl.store(OUT + row, best_id.to(tl.int64))


# Split vocabulary. One program per row leaves most of a GPU idle at decode batch sizes (B = 1: one program
# walks all 16384+ ids while the other SMs wait). Where the draw needs no statistic of the whole row (raw-logit
# guidance, no top-k / top-p: Janus's and LlamaGen's defaults), each row's allowed ids are cut into chunks, one
# program per (row, chunk) finds the chunk's best (argmax, or the race winner: the noise of an id does not depend
# on the chunk), and a merge takes the best over the chunks, the lowest id on ties, as the one-program scan does.
@triton.jit(do_not_specialize=["B", "lo", "hi", "chunk", "splits", "seed"])
def _cfg_sample_split_kernel(
    LOGITS,  # [G*B, V] logits, unit stride along V
    OFFSET,  # [1] int64 RNG offset (the decode step), read here
    PART_VALUE,  # [B, splits] fp32 out: each chunk's best score (greedy) or race value
    PART_ID,  # [B, splits] int64 out: the id that holds it
    B,
    V,
    stride_row,
    lo,  # allowed ids: [lo, hi), chunk c holds [lo + c chunk, lo + (c + 1) chunk)
    hi,
    chunk,
    splits,
    scale0,
    scale1,
    temperature,  # 0: greedy
    seed,  # int32 bit pattern of the uint32 seed
    G: tl.constexpr,  # groups: 1, 2 or 3
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    ROW = LOGITS + row.to(tl.int64) * stride_row
    group_stride = B.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    zero = tl.zeros((), tl.float32)
    stats = (zero, zero, zero, zero, zero, zero)  # raw logits: no log_softmax statistics
    first = lo + split * chunk
    last = tl.minimum(first + chunk, hi)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = first
    if temperature == 0.0:
        for start in range(first, last, BLOCK_V):
            ids = start + cols
            z = _scores(ROW, group_stride, ids, ids < last, stats, scale0, scale1, 1.0, G)
            best, best_id = _argmax_update(best, best_id, z, ids, last)
    else:
        key1, key2 = _row_keys(seed, tl.load(OFFSET), row)
        for start in range(first, last, BLOCK_V):
            ids = start + cols
            mask = ids < last
            s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
            race = tl.where(mask, s + _race_noise(ids, key1, key2), float("-inf"))
            best, best_id = _argmax_update(best, best_id, race, ids, last)
    tl.store(PART_VALUE + row * splits + split, best)
    tl.store(PART_ID + row * splits + split, best_id.to(tl.int64))


@triton.jit
def _first_best(VALUES, IDS, splits, BLOCK_S: tl.constexpr):
    """(the best of a row's chunk values, the id its first chunk holds): chunks hold increasing ids, so the first
    chunk holding the best holds its lowest id."""
    idx = tl.arange(0, BLOCK_S)
    mask = idx < splits
    values = tl.load(VALUES + idx, mask=mask, other=float("-inf"))
    ids = tl.load(IDS + idx, mask=mask, other=0)
    best = tl.max(values, axis=0)
    first = tl.min(tl.where(mask & (values == best), idx, BLOCK_S), axis=0)
    return best, tl.sum(tl.where(idx == first, ids, 0), axis=0)


@triton.jit(do_not_specialize=["splits"])
def _cfg_sample_merge_kernel(PART_VALUE, PART_ID, OUT, splits, BLOCK_S: tl.constexpr):
    """OUT[row] = the id of the best chunk value, the lowest id on ties."""
    row = tl.program_id(0)
    _, best_id = _first_best(PART_VALUE + row * splits, PART_ID + row * splits, splits, BLOCK_S)
    tl.store(OUT + row, best_id)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

# 4 ids per thread: about 60 registers on sm_80 and sm_90 with no stack, where 4 warps (8 ids per thread) put
# the call frame of div_rn's slow path on the stack.
_BLOCK_V = 1024
_NUM_WARPS = 8
_INT32_PATTERN = 1 << 32
_MERGE_WARPS = 1
_MAX_SPLITS = 128  # chunks per row: the merge reads them in one tile


def _vocab_splits(device: torch.device, rows: int, n: int) -> int:
    """Chunks per row for the split kernel: about two programs per SM over all rows, whole tiles per chunk, at
    most _MAX_SPLITS. 1 without a GPU (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_MAX_SPLITS, triton.cdiv(n, _BLOCK_V), triton.cdiv(programs, rows)))


def _merge_block(splits: int) -> int:
    return max(16, triton.next_power_of_2(splits))


def cfg_sample_fwd(
    logits: torch.Tensor,
    scales: tuple[float, ...],
    temperature: float,
    top_k: int,
    top_p: float,
    lo: int,
    hi: int,
    log_softmax: bool,
    seed: int,
    offset: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Guided sample of one id per row: fastmm.reference.sampling.cfg_sample_fwd's semantics and RNG.

    logits [G*B, V] fp32 / fp16 / bf16, G = len(scales) + 1, unit stride along V; 0 <= lo < hi <= V;
    temperature >= 0 (0: greedy); top_k >= 0 (0: off); top_p in (0, 1] (1: off); seed in [0, 2^32); offset
    None (step 0) or int64 [1] on logits' device, read by the kernel; out None or int64 [B] to write.
    Returns ids [B] int64 in [lo, hi). Rows split over several programs where the draw allows it
    (cfg_sample_in_chunks, _vocab_splits).
    """
    return cfg_sample_in_chunks(logits, scales, temperature, top_k, top_p, lo, hi, log_softmax, seed, offset, out,
                                None)  # fmt: skip


def cfg_sample_in_chunks(logits, scales, temperature, top_k, top_p, lo, hi, log_softmax, seed, offset, out,
                         splits: int | None) -> torch.Tensor:  # fmt: skip
    """cfg_sample_fwd with ``splits`` programs per row over the allowed ids (None: _vocab_splits, enough to fill
    the GPU where the draw allows a split and 1 on CPU tensors; tests force more under the interpreter)."""
    G = len(scales) + 1
    B, V = logits.shape[0] // G, logits.shape[1]
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=logits.device)
    scale0, scale1 = (*map(float, scales), 0.0, 0.0)[:2]
    seed_bits = seed - _INT32_PATTERN if seed >= _INT32_PATTERN // 2 else seed
    whole_row = log_softmax or 0 < top_k < hi - lo or top_p < 1.0  # the draw needs statistics of the whole row
    if splits is None:
        splits = 1 if whole_row else _vocab_splits(logits.device, B, hi - lo)
    if splits > 1:
        if whole_row:
            raise ValueError("cfg_sample_in_chunks: splits > 1 needs raw logits without top-k / top-p")
        chunk = triton.cdiv(triton.cdiv(hi - lo, splits), _BLOCK_V) * _BLOCK_V  # whole tiles per chunk
        splits = triton.cdiv(hi - lo, chunk)
    if splits > 1:
        part_value = torch.empty(B, splits, dtype=torch.float32, device=logits.device)
        part_id = torch.empty(B, splits, dtype=torch.int64, device=logits.device)
        _cfg_sample_split_kernel[(B, splits)](
            logits, offset, part_value, part_id, B, V, logits.stride(0), lo, hi, chunk, splits, scale0, scale1,
            float(temperature), seed_bits, G=G, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=1,
            enable_fp_fusion=False,
        )  # fmt: skip
        _cfg_sample_merge_kernel[(B,)](part_value, part_id, out, splits, BLOCK_S=_merge_block(splits),
                                       num_warps=_MERGE_WARPS, num_stages=1)  # fmt: skip
        return out
    _cfg_sample_kernel[(B,)](
        logits, offset, out, B, V, logits.stride(0), lo, hi, scale0, scale1, float(temperature), top_k,
        float(top_p), int(log_softmax), seed_bits, G=G, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=1,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time registration: every dtype and group count the launcher can run
# ----------------------------------------------------------------------------------------------------


def _aot_config(dtype: str, groups: int) -> AotConfig:
    """The launch for logits in ``dtype`` with ``groups`` groups; V and the row stride multiples of 16, as at
    every real vocabulary (16384, 32768, 65536). The AOT compile keeps triton's default FP fusion, the kernel
    launches without it: the same instructions but for FMAs, so the same register budget within a few."""
    constexprs = {"G": groups, "BLOCK_V": _BLOCK_V}
    pointers = {"LOGITS": f"*{dtype}", "OFFSET": "*i64", "OUT": "*i64"}
    floats = ("scale0", "scale1", "temperature", "top_p")
    signature = aot_signature(_cfg_sample_kernel, pointers, constexprs, floats=floats)
    label = f"{dtype} G={groups} BLOCK_V={_BLOCK_V}"
    return AotConfig(label, signature, constexprs, _NUM_WARPS, 1, ("V", "stride_row"))


register_aot(
    _cfg_sample_kernel, [_aot_config(dtype, groups) for dtype in TRITON_DTYPE.values() for groups in (1, 2, 3)]
)


def _split_aot_config(dtype: str, groups: int) -> AotConfig:
    """The split kernel's launch (as _aot_config)."""
    constexprs = {"G": groups, "BLOCK_V": _BLOCK_V}
    pointers = {"LOGITS": f"*{dtype}", "OFFSET": "*i64", "PART_VALUE": "*fp32", "PART_ID": "*i64"}
    floats = ("scale0", "scale1", "temperature")
    signature = aot_signature(_cfg_sample_split_kernel, pointers, constexprs, floats=floats)
    return AotConfig(f"{dtype} G={groups} BLOCK_V={_BLOCK_V}", signature, constexprs, _NUM_WARPS, 1,
                     ("V", "stride_row", "chunk"))  # fmt: skip


def _merge_aot_config(block_s: int) -> AotConfig:
    constexprs = {"BLOCK_S": block_s}
    pointers = {"PART_VALUE": "*fp32", "PART_ID": "*i64", "OUT": "*i64"}
    signature = aot_signature(_cfg_sample_merge_kernel, pointers, constexprs)
    return AotConfig(f"BLOCK_S={block_s}", signature, constexprs, _MERGE_WARPS, 1, ())


register_aot(
    _cfg_sample_split_kernel,
    [_split_aot_config(dtype, groups) for dtype in TRITON_DTYPE.values() for groups in (1, 2, 3)],
)
register_aot(_cfg_sample_merge_kernel, [_merge_aot_config(block_s) for block_s in (16, _MAX_SPLITS)])


# ----------------------------------------------------------------------------------------------------
# Speculative Jacobi decoding: the verification of a window (reference: jacobi_verify_fwd)
# ----------------------------------------------------------------------------------------------------
#
# Two kernels, as the native version splits it. _jacobi_rows_kernel runs one program per window row (b, t): it
# computes p, cfg_sample's processed distribution of the row (the same scores, kept set and tie rules as
# _cfg_sample_kernel), writes it to probs, and finds the row's acceptance flag (position < limit and
# u q(d) < p(d), u from stream 1), its redraft (the race of log p, stream 0) and its correction candidate (the
# race of log max(0, p - q), stream 2). _jacobi_finish_kernel runs one program per image: the accepted run, the
# correction at its end, the tokens and count, and zeros in probs over the slots < count. Race ids are relative
# to lo, as the reference's. No host sync: limit is an argument, everything else stays on the device.


@triton.jit
def _log_positive(w):
    """log w where w > 0; 0 elsewhere (masked by the caller: log 0 = -inf never wins a race), so that no lane
    takes the log of 0."""
    return tl.log(tl.where(w > 0.0, w, 1.0))


@triton.jit
def _verify_pass(ROW, group_stride, P_ROW, Q_ROW, first, last, lo, n, draft, position, b, stats, scale0, scale1,
                 temperature, best_id, min_key, s_max, total, seed, G: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """One pass of a window row over its allowed ids [first, last) (all of [lo, hi), or one chunk of them), given
    the row's statistics (the argmax best_id at temperature 0; else the kept set's min_key, s_max and total):
    writes p there and returns (p(draft) over these ids, 0 if the draft lies elsewhere, then the best value and
    relative id of the redraft race, log p with stream 0, and of the correction race, log max(0, p - q) with
    stream 2), ties to the lowest id."""
    cols = tl.arange(0, BLOCK_V)
    redraft_key1, redraft_key2 = _row_keys(seed, position, b)  # stream 0
    correction_key1, correction_key2 = _row_keys(seed, position + (2 << 32), b)
    p_draft = tl.zeros((), tl.float32)
    redraft_best = tl.full((), float("-inf"), tl.float32)
    redraft_id = first - lo
    correction_best = tl.full((), float("-inf"), tl.float32)
    correction_id = first - lo
    for start in range(first, last, BLOCK_V):
        ids = start + cols
        mask = ids < last
        if temperature == 0.0:
            p = tl.where(ids == best_id, 1.0, 0.0)
        else:
            s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
            kept = mask & (_ordered_keys(s) >= min_key)
            p = tl.where(kept, tl.math.div_rn(tl.exp(s - s_max), total), 0.0)
        rel = ids - lo
        tl.store(P_ROW + rel, p, mask=mask)
        p_draft += tl.sum(tl.where(rel == draft, p, 0.0), axis=0)
        key = tl.where(mask & (p > 0.0), _log_positive(p) + _race_noise(rel, redraft_key1, redraft_key2),
                       float("-inf"))  # fmt: skip
        redraft_best, redraft_id = _argmax_update(redraft_best, redraft_id, key, rel, n)
        residual = tl.maximum(p - tl.load(Q_ROW + rel, mask=mask, other=0.0), 0.0)
        key = tl.where(mask & (residual > 0.0),
                       _log_positive(residual) + _race_noise(rel, correction_key1, correction_key2),
                       float("-inf"))  # fmt: skip
        correction_best, correction_id = _argmax_update(correction_best, correction_id, key, rel, n)
    return p_draft, redraft_best, redraft_id, correction_best, correction_id


@triton.jit
def _accepted(seed, position, b, limit, q_draft, p_draft):
    """The acceptance test of a draft: its position is before limit and u q(d) < p(d), u from stream 1."""
    accept_key1, accept_key2 = _row_keys(seed, position + (1 << 32), b)
    u = (_hash32(accept_key1 ^ accept_key2).to(tl.float32) + 0.5) * _TWO_POW_MINUS_32
    return (position < limit) & (u * q_draft < p_draft)




@triton.jit(do_not_specialize=["rows", "W", "lo", "hi", "top_k", "log_softmax", "seed", "limit"])
def _jacobi_rows_kernel(
    LOGITS,  # [G*N*W, V] the window's logits, group-major, unit stride along V
    DRAFTS,  # [N*W] int64 absolute draft ids
    DRAFT_PROBS,  # [N*W, hi - lo] fp32: each draft's q
    START,  # [N] int64 position of slot 0
    PROBS,  # [N*W, hi - lo] fp32 out: p
    ACCEPT,  # [N*W] int32 out: 1 where the draft is accepted (and its position < limit)
    REDRAFT,  # [N*W] int64 out: the race winner of log p (stream 0), absolute
    CORRECTION,  # [N*W] int64 out: the race winner of log max(0, p - q) (stream 2), absolute
    rows,  # N*W
    W,
    V,
    stride_row,
    limit,
    lo,
    hi,
    scale0,
    scale1,
    temperature,
    top_k,
    top_p,
    log_softmax,
    seed,
    G: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // W
    ROW = LOGITS + row.to(tl.int64) * stride_row
    group_stride = rows.to(tl.int64) * stride_row
    n = hi - lo
    P_ROW = PROBS + row.to(tl.int64) * n
    Q_ROW = DRAFT_PROBS + row.to(tl.int64) * n
    cols = tl.arange(0, BLOCK_V)

    zero = tl.zeros((), tl.float32)
    stats = _group_stats(ROW, group_stride, V, log_softmax, G, BLOCK_V)

    # p = one-hot at the argmax (temperature 0), else exp(s - s_max) / total over the kept ids.
    best_id = lo
    min_key = tl.zeros((), tl.uint32)
    s_max = zero
    total = zero + 1.0
    if temperature == 0.0:
        best = tl.full((), float("-inf"), tl.float32)
        for start in range(lo, hi, BLOCK_V):
            ids = start + cols
            z = _scores(ROW, group_stride, ids, ids < hi, stats, scale0, scale1, 1.0, G)
            best, best_id = _argmax_update(best, best_id, z, ids, hi)
    else:
        min_key = _kept_min_key(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, top_k, top_p, G,
                                BLOCK_V)  # fmt: skip
        s_max = _max_score(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, G, BLOCK_V)  # kept: top
        total = _kept_mass(ROW, group_stride, lo, hi, stats, scale0, scale1, temperature, min_key, 0, s_max, G,
                           BLOCK_V)  # fmt: skip

    position = tl.load(START + b) + row % W
    draft = tl.load(DRAFTS + row) - lo
    p_draft, redraft_best, redraft_id, correction_best, correction_id = _verify_pass(
        ROW, group_stride, P_ROW, Q_ROW, lo, hi, lo, n, draft, position, b, stats, scale0, scale1, temperature,
        best_id, min_key, s_max, total, seed, G, BLOCK_V)  # fmt: skip
    ok = _accepted(seed, position, b, limit, tl.load(Q_ROW + draft), p_draft)
    tl.store(ACCEPT + row, ok.to(tl.int32))
    tl.store(REDRAFT + row, (redraft_id + lo).to(tl.int64))
    tl.store(CORRECTION + row, (correction_id + lo).to(tl.int64))


# Split vocabulary, as cfg_sample's: one program per window row walks all 16384+ ids of its row W x 2 times, and a
# verification has only N x W rows (8 to 32). Where p needs no statistic beyond the max and the sum of exp (raw-logit
# guidance, no top-k / top-p), the row's allowed ids are cut into chunks:
#   _jacobi_split_stats_kernel  per (row, chunk): the chunk's argmax (temperature 0), or its max m_c and
#                               sum of exp(s - m_c) (0 for a chunk of -inf scores only);
#   _jacobi_split_rows_kernel   per (row, chunk): merges those into the row's argmax, or s_max and
#                               total = sum over chunks of sum_c exp(m_c - s_max), then runs _verify_pass over its
#                               chunk (writes p, the chunk's share of p(d), the chunk's race winners);
#   _jacobi_split_merge_kernel  per row: p(d), the race winners over the chunks (the lowest id on ties) and the
#                               acceptance flag, for _jacobi_finish_kernel.
# total sums in another order than the one-program kernel's, so p can differ from it in the last bit.
@triton.jit(do_not_specialize=["lo", "hi", "chunk", "splits"])
def _jacobi_split_stats_kernel(
    LOGITS,  # [G*rows, V] the window's logits, group-major, unit stride along V
    PART_MAX,  # [rows, splits] fp32 out: the chunk's max score (its argmax's score at temperature 0)
    PART_SUM,  # [rows, splits] fp32 out: sum of exp(s - max) over the chunk (unused at temperature 0)
    PART_ID,  # [rows, splits] int64 out: the chunk's argmax, absolute (temperature 0)
    rows,
    V,
    stride_row,
    lo,
    hi,
    chunk,
    splits,
    scale0,
    scale1,
    temperature,
    G: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    ROW = LOGITS + row.to(tl.int64) * stride_row
    group_stride = rows.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    zero = tl.zeros((), tl.float32)
    stats = (zero, zero, zero, zero, zero, zero)  # raw logits
    first = lo + split * chunk
    last = tl.minimum(first + chunk, hi)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = first
    total = zero
    if temperature == 0.0:
        for start in range(first, last, BLOCK_V):
            ids = start + cols
            z = _scores(ROW, group_stride, ids, ids < last, stats, scale0, scale1, 1.0, G)
            best, best_id = _argmax_update(best, best_id, z, ids, last)
    else:
        running = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        for start in range(first, last, BLOCK_V):
            ids = start + cols
            running = tl.maximum(running, _scores(ROW, group_stride, ids, ids < last, stats, scale0, scale1,
                                                  temperature, G))  # fmt: skip
        best = tl.max(running, axis=0)
        shift = tl.where(best > float("-inf"), best, 0.0)  # a chunk of -inf scores only sums to 0, not NaN
        partial = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(first, last, BLOCK_V):
            ids = start + cols
            mask = ids < last
            s = _scores(ROW, group_stride, ids, mask, stats, scale0, scale1, temperature, G)
            partial += tl.where(mask, tl.exp(s - shift), 0.0)
        total = tl.sum(partial, axis=0)
    tl.store(PART_MAX + row * splits + split, best)
    tl.store(PART_SUM + row * splits + split, total)
    tl.store(PART_ID + row * splits + split, best_id.to(tl.int64))


@triton.jit(do_not_specialize=["W", "lo", "hi", "chunk", "splits", "seed"])
def _jacobi_split_rows_kernel(
    LOGITS,  # [G*rows, V]
    DRAFTS,  # [rows] int64 absolute draft ids
    DRAFT_PROBS,  # [rows, hi - lo] fp32: q
    START,  # [N] int64 position of slot 0
    PART_MAX,  # [rows, splits] fp32: from _jacobi_split_stats_kernel
    PART_SUM,
    PART_ID,
    PROBS,  # [rows, hi - lo] fp32 out: p
    PART_P_DRAFT,  # [rows, splits] fp32 out: the chunk's share of p(draft)
    PART_REDRAFT,  # [rows, splits] fp32 out: the chunk's best redraft race value
    PART_REDRAFT_ID,  # [rows, splits] int64 out: its id, relative to lo
    PART_CORRECTION,  # [rows, splits] fp32 out: the chunk's best correction race value
    PART_CORRECTION_ID,  # [rows, splits] int64 out
    rows,
    W,
    V,
    stride_row,
    lo,
    hi,
    chunk,
    splits,
    scale0,
    scale1,
    temperature,
    seed,
    G: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // W
    ROW = LOGITS + row.to(tl.int64) * stride_row
    group_stride = rows.to(tl.int64) * stride_row
    n = hi - lo
    zero = tl.zeros((), tl.float32)
    stats = (zero, zero, zero, zero, zero, zero)
    parts = row * splits
    best_id = lo
    s_max = zero
    total = zero + 1.0
    if temperature == 0.0:
        _, winner = _first_best(PART_MAX + parts, PART_ID + parts, splits, BLOCK_S)
        best_id = winner.to(tl.int32)  # an id < V
    else:
        idx = tl.arange(0, BLOCK_S)
        chunk_max = tl.load(PART_MAX + parts + idx, mask=idx < splits, other=float("-inf"))
        chunk_sum = tl.load(PART_SUM + parts + idx, mask=idx < splits, other=0.0)
        s_max = tl.max(chunk_max, axis=0)
        # A chunk of -inf scores only has sum 0 and adds 0 (its max is read as s_max, so no -inf - -inf).
        rescale = tl.exp(tl.where(chunk_max > float("-inf"), chunk_max, s_max) - s_max)
        total = tl.sum(chunk_sum * rescale, axis=0)
    first = lo + split * chunk
    last = tl.minimum(first + chunk, hi)
    position = tl.load(START + b) + row % W
    draft = tl.load(DRAFTS + row) - lo
    P_ROW = PROBS + row.to(tl.int64) * n
    Q_ROW = DRAFT_PROBS + row.to(tl.int64) * n
    p_draft, redraft_best, redraft_id, correction_best, correction_id = _verify_pass(
        ROW, group_stride, P_ROW, Q_ROW, first, last, lo, n, draft, position, b, stats, scale0, scale1, temperature,
        best_id, tl.zeros((), tl.uint32), s_max, total, seed, G, BLOCK_V)  # fmt: skip
    tl.store(PART_P_DRAFT + parts + split, p_draft)
    tl.store(PART_REDRAFT + parts + split, redraft_best)
    tl.store(PART_REDRAFT_ID + parts + split, redraft_id.to(tl.int64))
    tl.store(PART_CORRECTION + parts + split, correction_best)
    tl.store(PART_CORRECTION_ID + parts + split, correction_id.to(tl.int64))


@triton.jit(do_not_specialize=["W", "lo", "hi", "splits", "seed", "limit"])
def _jacobi_split_merge_kernel(
    DRAFTS,  # [rows] int64
    DRAFT_PROBS,  # [rows, hi - lo] fp32
    START,  # [N] int64
    PART_P_DRAFT,  # [rows, splits]: from _jacobi_split_rows_kernel
    PART_REDRAFT,
    PART_REDRAFT_ID,
    PART_CORRECTION,
    PART_CORRECTION_ID,
    ACCEPT,  # [rows] int32 out, as _jacobi_rows_kernel's
    REDRAFT,  # [rows] int64 out, absolute
    CORRECTION,  # [rows] int64 out, absolute
    W,
    lo,
    hi,
    splits,
    limit,
    seed,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // W
    parts = row * splits
    idx = tl.arange(0, BLOCK_S)
    p_draft = tl.sum(tl.load(PART_P_DRAFT + parts + idx, mask=idx < splits, other=0.0), axis=0)
    _, redraft_id = _first_best(PART_REDRAFT + parts, PART_REDRAFT_ID + parts, splits, BLOCK_S)
    _, correction_id = _first_best(PART_CORRECTION + parts, PART_CORRECTION_ID + parts, splits, BLOCK_S)
    position = tl.load(START + b) + row % W
    draft = tl.load(DRAFTS + row) - lo
    q_draft = tl.load(DRAFT_PROBS + row.to(tl.int64) * (hi - lo) + draft)
    ok = _accepted(seed, position, b, limit, q_draft, p_draft)
    tl.store(ACCEPT + row, ok.to(tl.int32))
    tl.store(REDRAFT + row, redraft_id + lo)
    tl.store(CORRECTION + row, correction_id + lo)


@triton.jit(do_not_specialize=["W", "n", "limit"])
def _jacobi_finish_kernel(
    DRAFTS,  # [N, W] int64
    START,  # [N] int64
    ACCEPT,  # [N, W] int32
    REDRAFT,  # [N, W] int64
    CORRECTION,  # [N, W] int64
    COUNT,  # [N] int64 out
    TOKENS,  # [N, W] int64 out
    PROBS,  # [N, W, n] fp32 in and out: zeroed over the slots < count
    W,
    n,
    limit,
    BLOCK_W: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    b = tl.program_id(0)
    slots = tl.arange(0, BLOCK_W)
    in_window = slots < W
    base = b * W
    ok = tl.load(ACCEPT + base + slots, mask=in_window, other=0)
    accepted = tl.min(tl.where(in_window & (ok == 0), slots, W), axis=0)  # the first rejection, W if none
    corrects = (accepted < W) & (tl.load(START + b) + accepted < limit)
    count = accepted + corrects.to(tl.int32)
    drafts = tl.load(DRAFTS + base + slots, mask=in_window, other=0)
    redraft = tl.load(REDRAFT + base + slots, mask=in_window, other=0)
    correction = tl.load(CORRECTION + base + slots, mask=in_window, other=0)
    tokens = tl.where(slots < accepted, drafts, tl.where((slots == accepted) & corrects, correction, redraft))
    tl.store(TOKENS + base + slots, tokens, mask=in_window)
    tl.store(COUNT + b, count.to(tl.int64))
    P_IMAGE = PROBS + base.to(tl.int64) * n
    zeroed = count.to(tl.int64) * n
    offsets = tl.arange(0, BLOCK_Z)
    for start in range(0, zeroed, BLOCK_Z):
        tl.store(P_IMAGE + start + offsets, tl.zeros((BLOCK_Z,), tl.float32), mask=start + offsets < zeroed)


_BLOCK_Z = 1024
_FINISH_WARPS = 4


def _rows_block_v(device: torch.device, n: int, V: int) -> int:
    """_BLOCK_V on the GPU; under the interpreter (CPU tensors) tiles no wider than the row, for speed."""
    return _BLOCK_V if device.type == "cuda" else min(_BLOCK_V, triton.next_power_of_2(max(n, V)))


def jacobi_verify_fwd(logits, drafts, draft_probs, start, limit, scales, temperature, top_k, top_p, lo, hi,
                      log_softmax, seed):  # fmt: skip
    """One SJD verification: fastmm.reference.sampling.jacobi_verify_fwd's semantics and RNG.

    logits [G*N, W, V] contiguous fp32 / fp16 / bf16; drafts [N, W] int64 absolute ids in [lo, hi);
    draft_probs [N, W, hi - lo] fp32; start [N] int64; limit an int. Returns (count [N] int64, tokens [N, W]
    int64, probs [N, W, hi - lo] fp32). Rows split over several programs where p allows it
    (jacobi_verify_in_chunks, _vocab_splits)."""
    return jacobi_verify_in_chunks(logits, drafts, draft_probs, start, limit, scales, temperature, top_k, top_p, lo,
                                   hi, log_softmax, seed, None)  # fmt: skip


def jacobi_verify_in_chunks(logits, drafts, draft_probs, start, limit, scales, temperature, top_k, top_p, lo, hi,
                            log_softmax, seed, splits: int | None):  # fmt: skip
    """jacobi_verify_fwd with ``splits`` programs per window row over the allowed ids (None: _vocab_splits where
    p needs only the row's max and sum, 1 otherwise and on CPU tensors; tests force more under the
    interpreter)."""
    G = len(scales) + 1
    N, W = drafts.shape
    V, n = logits.shape[-1], hi - lo
    device = logits.device
    rows = N * W
    flat = logits.reshape(G * rows, V)
    probs = torch.empty(N, W, n, dtype=torch.float32, device=device)
    accept = torch.empty(N, W, dtype=torch.int32, device=device)
    redraft = torch.empty(N, W, dtype=torch.int64, device=device)
    correction = torch.empty(N, W, dtype=torch.int64, device=device)
    count = torch.empty(N, dtype=torch.int64, device=device)
    tokens = torch.empty(N, W, dtype=torch.int64, device=device)
    scale0, scale1 = (*map(float, scales), 0.0, 0.0)[:2]
    seed_bits = seed - _INT32_PATTERN if seed >= _INT32_PATTERN // 2 else seed
    limit = min(int(limit), 2**31 - 1)  # positions are int64, but no window reaches 2^31
    whole_row = log_softmax or 0 < top_k < n or top_p < 1.0  # p needs more than the row's max and sum
    if splits is None:
        splits = 1 if whole_row else _vocab_splits(device, rows, n)
    if splits > 1:
        if whole_row:
            raise ValueError("jacobi_verify_in_chunks: splits > 1 needs raw logits without top-k / top-p")
        chunk = triton.cdiv(triton.cdiv(n, splits), _BLOCK_V) * _BLOCK_V  # whole tiles per chunk
        splits = triton.cdiv(n, chunk)
    block_v = _rows_block_v(device, n, V)
    if splits > 1:
        block_s = _merge_block(splits)
        part_max, part_sum, part_p_draft, part_redraft, part_correction = (
            torch.empty(rows, splits, dtype=torch.float32, device=device) for _ in range(5))  # fmt: skip
        part_id, part_redraft_id, part_correction_id = (
            torch.empty(rows, splits, dtype=torch.int64, device=device) for _ in range(3))  # fmt: skip
        _jacobi_split_stats_kernel[(rows, splits)](
            flat, part_max, part_sum, part_id, rows, V, flat.stride(0), lo, hi, chunk, splits, scale0, scale1,
            float(temperature), G=G, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=1, enable_fp_fusion=False,
        )  # fmt: skip
        _jacobi_split_rows_kernel[(rows, splits)](
            flat, drafts, draft_probs, start, part_max, part_sum, part_id, probs, part_p_draft, part_redraft,
            part_redraft_id, part_correction, part_correction_id, rows, W, V, flat.stride(0), lo, hi, chunk, splits,
            scale0, scale1, float(temperature), seed_bits, G=G, BLOCK_V=_BLOCK_V, BLOCK_S=block_s,
            num_warps=_NUM_WARPS, num_stages=1, enable_fp_fusion=False,
        )  # fmt: skip
        _jacobi_split_merge_kernel[(rows,)](
            drafts, draft_probs, start, part_p_draft, part_redraft, part_redraft_id, part_correction,
            part_correction_id, accept, redraft, correction, W, lo, hi, splits, limit, seed_bits, BLOCK_S=block_s,
            num_warps=_MERGE_WARPS, num_stages=1,
        )  # fmt: skip
    else:
        _jacobi_rows_kernel[(rows,)](
            flat, drafts, draft_probs, start, probs, accept, redraft, correction, rows, W, V, flat.stride(0), limit,
            lo, hi, scale0, scale1, float(temperature), top_k, float(top_p), int(log_softmax), seed_bits, G=G,
            BLOCK_V=block_v, num_warps=_NUM_WARPS, num_stages=1, enable_fp_fusion=False,
        )  # fmt: skip
    _jacobi_finish_kernel[(N,)](
        drafts, start, accept, redraft, correction, count, tokens, probs, W, n, limit,
        BLOCK_W=triton.next_power_of_2(W), BLOCK_Z=_BLOCK_Z, num_warps=_FINISH_WARPS, num_stages=1,
    )  # fmt: skip
    return count, tokens, probs


def _jacobi_rows_aot_config(dtype: str, groups: int) -> AotConfig:
    """The row kernel's launch for logits in ``dtype`` with ``groups`` groups (V and the row stride multiples of
    16, as _aot_config)."""
    constexprs = {"G": groups, "BLOCK_V": _BLOCK_V}
    pointers = {"LOGITS": f"*{dtype}", "DRAFTS": "*i64", "DRAFT_PROBS": "*fp32", "START": "*i64", "PROBS": "*fp32",
                "ACCEPT": "*i32", "REDRAFT": "*i64", "CORRECTION": "*i64"}  # fmt: skip
    floats = ("scale0", "scale1", "temperature", "top_p")
    signature = aot_signature(_jacobi_rows_kernel, pointers, constexprs, floats=floats)
    label = f"{dtype} G={groups} BLOCK_V={_BLOCK_V}"
    return AotConfig(label, signature, constexprs, _NUM_WARPS, 1, ("V", "stride_row"))


def _jacobi_finish_aot_config(block_w: int) -> AotConfig:
    """The finishing kernel's launch for windows of up to ``block_w`` slots."""
    constexprs = {"BLOCK_W": block_w, "BLOCK_Z": _BLOCK_Z}
    pointers = {"DRAFTS": "*i64", "START": "*i64", "ACCEPT": "*i32", "REDRAFT": "*i64", "CORRECTION": "*i64",
                "COUNT": "*i64", "TOKENS": "*i64", "PROBS": "*fp32"}  # fmt: skip
    signature = aot_signature(_jacobi_finish_kernel, pointers, constexprs)
    return AotConfig(f"BLOCK_W={block_w} BLOCK_Z={_BLOCK_Z}", signature, constexprs, _FINISH_WARPS, 1, ("n",))


register_aot(
    _jacobi_rows_kernel,
    [_jacobi_rows_aot_config(dtype, groups) for dtype in TRITON_DTYPE.values() for groups in (1, 2, 3)],
)
register_aot(_jacobi_finish_kernel, [_jacobi_finish_aot_config(block_w) for block_w in (1, 16, 64)])


def _jacobi_split_aot_configs() -> dict:
    """The split verification's three launches: every logits dtype and group count, merges of up to 16 and up
    to _MAX_SPLITS chunks."""
    floats = ("scale0", "scale1", "temperature")
    stats, rows = [], []
    for dtype in TRITON_DTYPE.values():
        for groups in (1, 2, 3):
            constexprs = {"G": groups, "BLOCK_V": _BLOCK_V}
            pointers = {"LOGITS": f"*{dtype}", "PART_MAX": "*fp32", "PART_SUM": "*fp32", "PART_ID": "*i64"}
            signature = aot_signature(_jacobi_split_stats_kernel, pointers, constexprs, floats=floats)
            stats.append(AotConfig(f"{dtype} G={groups} BLOCK_V={_BLOCK_V}", signature, constexprs, _NUM_WARPS, 1,
                                   ("V", "stride_row", "chunk")))  # fmt: skip
            for block_s in (16, _MAX_SPLITS):
                constexprs = {"G": groups, "BLOCK_V": _BLOCK_V, "BLOCK_S": block_s}
                pointers = {"LOGITS": f"*{dtype}", "DRAFTS": "*i64", "DRAFT_PROBS": "*fp32", "START": "*i64",
                            "PART_MAX": "*fp32", "PART_SUM": "*fp32", "PART_ID": "*i64", "PROBS": "*fp32",
                            "PART_P_DRAFT": "*fp32", "PART_REDRAFT": "*fp32", "PART_REDRAFT_ID": "*i64",
                            "PART_CORRECTION": "*fp32", "PART_CORRECTION_ID": "*i64"}  # fmt: skip
                signature = aot_signature(_jacobi_split_rows_kernel, pointers, constexprs, floats=floats)
                rows.append(AotConfig(f"{dtype} G={groups} BLOCK_V={_BLOCK_V} BLOCK_S={block_s}", signature,
                                      constexprs, _NUM_WARPS, 1, ("V", "stride_row", "chunk")))  # fmt: skip
    merges = []
    for block_s in (16, _MAX_SPLITS):
        constexprs = {"BLOCK_S": block_s}
        pointers = {"DRAFTS": "*i64", "DRAFT_PROBS": "*fp32", "START": "*i64", "PART_P_DRAFT": "*fp32",
                    "PART_REDRAFT": "*fp32", "PART_REDRAFT_ID": "*i64", "PART_CORRECTION": "*fp32",
                    "PART_CORRECTION_ID": "*i64", "ACCEPT": "*i32", "REDRAFT": "*i64", "CORRECTION": "*i64"}  # fmt: skip
        signature = aot_signature(_jacobi_split_merge_kernel, pointers, constexprs)
        merges.append(AotConfig(f"BLOCK_S={block_s}", signature, constexprs, _MERGE_WARPS, 1, ()))
    return {_jacobi_split_stats_kernel: stats, _jacobi_split_rows_kernel: rows, _jacobi_split_merge_kernel: merges}


for _kernel, _configs in _jacobi_split_aot_configs().items():
    register_aot(_kernel, _configs)
