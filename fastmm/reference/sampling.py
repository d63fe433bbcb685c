"""Reference semantics of the `sampling` family: fused classifier-free-guidance (CFG) sampling of image tokens.

``cfg_sample_fwd`` below is both the spec of fastmm.ops.cfg_sample and the kernel-level interface every backend
module (fastmm.<backend>.sampling) implements, with the options already normalized by the op (top_k 0 = off,
top_p 1.0 = off, allowed as lo, hi). Per output row b, in fp32 whatever the input dtype:

1. Groups. logits [G*B, V] stacks G groups group-major, most conditioned first: g_j = logits[j*B + b]
   (log-softmaxed over all V ids first for mix "log_softmax", Emu3; raw for "logits", Janus and Chameleon).
2. Guidance. z = g_{G-1}, then for j = G-2 down to 0: z = z + (g_j - g_{j+1}) * scales[j], every operation
   rounded to fp32 (no fused multiply-add). G = 2 is u + (c - u) * s, transformers'
   ClassifierFreeGuidanceLogitsProcessor bit for bit; G = 3 is u + (i - u) * s_img + (c - i) * s_txt.
   A NaN in z (a NaN logit, or inf - inf) is -inf: it never wins. Other infinities follow IEEE arithmetic.
3. Only ids in allowed = [lo, hi) compete (the image vocabulary inside a shared one); ids returned are
   absolute. Below, "s" and "kept" refer to those ids only.
4. temperature 0: argmax z, the lowest id on ties (like torch.argmax); lo when every z is -inf.
5. Otherwise s = z / temperature (IEEE division), then the kept set, top-k first and top-p second (Hugging
   Face's TopK then TopP warpers; TopP drops the ids whose ascending cumulative probability is <= 1 - top_p,
   the same set but for ties and rounding). Both rules compare values, so no backend depends on a sort order:
   - top-k: keep s >= s_(k), the k-th largest s (counted with multiplicity): ties with it are all kept.
   - top-p: w = exp(s - max s) over the kept ids, Z = sum of w. tau is the largest value t among the kept s
     whose mass, the sum of w over kept s >= t, reaches top_p * Z; keep s >= tau (ties with tau all kept,
     the max always kept). If rounding leaves no such t (Z is NaN when the max is +-inf), keep all.
     The sums are fp32 in a backend's own order (here: descending s); kept sets can only differ where a
     mass lies within rounding of top_p * Z.
6. Exponential race: the id maximizing key = s - log(E) over the kept ids, E ~ Exp(1) i.i.d. per (row, id)
   (argmax p / E: an exact sample of softmax(s) over the kept set), the lowest id on ties.

Randomness: a counter-based hash, so that every backend draws the same E for the same (seed, offset, b, v),
with all arithmetic on uint32 (emulated here in int64 & 0xFFFFFFFF) and fp32:
    hash32          Chris Wellons' lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
                    x ^= x >> 16
    state           = hash32(hash32(hash32(seed) ^ offset_lo) ^ offset_hi), offset's low and high 32 bits
    key1, key2      = hash32(state ^ b), hash32(key1 ^ 0x9e3779b9)              (per row)
    bits(v)         = hash32(hash32(v ^ key1) ^ key2)                           (per id v, absolute)
    W               = min(fp32(bits) + 0.5, 2^32 - 256) * 2^-32                 in [2^-33, 1 - 2^-24]
    E               = -log1p(-W), computed as -(log(u) + (x - (u - 1))) with x = -W, u = 1 + x
The winners of a race have small E, so E is built from W, which is fine-grained near 0 (32 bits, fp32
relative precision), through log1p. E = -log(u) of a uniform u on a 2^-24 grid would quantize small E to
multiples of 2^-24, a visible tie bias over tens of thousands of ids (and ((bits >> 8) + 0.5) * 2^-24 is not
even an fp32: it needs 25 bits, rounds to 1 at the top, and E = 0 would win whatever the score). u = 1 + x
drops the low bits of x; x - (u - 1) is exactly what was dropped, and adding it to log(u) restores log1p(x)
to within 3 ulps of E (the first-order correction would also divide it by u, in (1/2, 1]: a division per id
for a last bit). log is ``log_f32``: FreeBSD / musl's logf (under 1 ulp) as a fixed sequence of fp32
operations that every backend repeats exactly.

With those definitions, mixing, scaling and the race are bit-exact across backends for mix "logits": the
same ids for the same (seed, offset) whenever the kept sets agree. log_softmax (a sum over V) and top-p
(sums of w) depend on summation order, so there only near-ties can resolve differently.
"""

from __future__ import annotations

import struct

import torch

MIXES = ("logits", "log_softmax")

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: decorrelates key2 from key1
_HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def _f32(bits: int) -> float:
    """The fp32 value with the given bit pattern, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# FreeBSD e_logf.c / musl logf.c: ln 2 split in two, and the minimax coefficients of (log(1+s)-log(1-s))/s.
LN2_HI = _f32(0x3F317180)
LN2_LO = _f32(0x3717F7D1)
LG1 = _f32(0x3F2AAAAA)
LG2 = _f32(0x3ECCCE13)
LG3 = _f32(0x3E91E9EE)
LG4 = _f32(0x3E789E26)
# Reduction of x to [sqrt(2)/2, sqrt(2)): biasing the bits by 1.0 - sqrt(2)/2 carries into the exponent exactly
# when the mantissa reaches sqrt(2).
SQRT_HALF_BITS = 0x3F3504F3
ONE_BITS = 0x3F800000
W_MAX = float(2**32 - 256)  # the largest fp32 below 2^32


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal fp32 x, with FreeBSD / musl logf's operations in their order.

    x = 2^k m with m in [sqrt(2)/2, sqrt(2)), f = m - 1 (exact), s = f / (2 + f), and
    log x = k ln2_hi + (f - (hfsq - (s (hfsq + R) + k ln2_lo))) with hfsq = f^2 / 2 and R a polynomial in s^2.
    Every backend evaluates these very operations, each rounded to fp32, so all agree bit for bit."""
    bits = x.view(torch.int32) + (ONE_BITS - SQRT_HALF_BITS)
    k = (bits >> 23) - 0x7F
    f = ((bits & 0x007FFFFF) + SQRT_HALF_BITS).view(torch.float32) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (LG1 + w * LG3) + w * (LG2 + w * LG4)
    hfsq = 0.5 * f * f
    dk = k.float()
    return s * (hfsq + r) + dk * LN2_LO - hfsq + f + dk * LN2_HI


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, in two halves so that no product overflows int64."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, _HASH_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _HASH_MULTIPLIERS[1])
    return x ^ (x >> 16)


def row_keys(seed: int, offset: torch.Tensor | None, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(key1, key2), [rows] int64 each: the per-row words of the RNG for (seed, offset). offset is read as a
    tensor (no host sync); None is step 0."""
    step = torch.zeros(1, dtype=torch.int64, device=device) if offset is None else offset.reshape(1)
    state = hash32(torch.full((1,), seed, dtype=torch.int64, device=device))
    state = hash32(state ^ (step & _MASK32))
    state = hash32(state ^ ((step >> 32) & _MASK32))
    key1 = hash32(state ^ torch.arange(rows, device=device))
    return key1, hash32(key1 ^ _GOLDEN)


def exponential(bits: torch.Tensor) -> torch.Tensor:
    """E = -log1p(-W) in fp32 for 32 random bits (int64 values in [0, 2^32)); see the module docstring."""
    w = torch.clamp_max(bits.float() + 0.5, W_MAX) * 2.0**-32
    x = -w
    u = 1.0 + x
    return -(log_f32(u) + (x - (u - 1.0)))  # log1p(x) = log(u) + log1p(((1 + x) - u) / u), see the docstring


def race_noise(seed: int, offset: torch.Tensor | None, rows: int, lo: int, hi: int, device) -> torch.Tensor:
    """-log(E) for every row and id in [lo, hi), [rows, hi - lo] fp32: what the race adds to s."""
    key1, key2 = row_keys(seed, offset, rows, device)
    ids = torch.arange(lo, hi, device=device)
    bits = hash32(hash32(ids[None, :] ^ key1[:, None]) ^ key2[:, None])
    return -log_f32(exponential(bits))


def guided_scores(logits: torch.Tensor, scales: tuple[float, ...], log_softmax: bool) -> torch.Tensor:
    """z [B, V] fp32 from logits [G*B, V], G = len(scales) + 1 (steps 1 and 2), NaN as -inf."""
    G = len(scales) + 1
    groups = logits.float().reshape(G, -1, logits.shape[1])  # (G, B, V)
    if log_softmax:
        groups = torch.log_softmax(groups, dim=-1)
    z = groups[G - 1]
    for j in reversed(range(G - 1)):
        z = z + (groups[j] - groups[j + 1]) * float(scales[j])
    return z.masked_fill(z.isnan(), float("-inf"))


def kept_mask(s: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Bool [B, n]: which scores s [B, n] survive top-k (0 = off) then top-p (1.0 = off), rules of step 5."""
    keep = torch.ones_like(s, dtype=torch.bool)
    if 0 < top_k < s.shape[1]:
        keep = s >= torch.topk(s, top_k, dim=1).values[:, -1:]
    if top_p < 1.0:
        ordered = torch.sort(s.masked_fill(~keep, float("-inf")), dim=1, descending=True).values
        mass = torch.cumsum(torch.exp(ordered - ordered[:, :1]), dim=1)  # ids top-k removed weigh 0
        reached = mass >= top_p * mass[:, -1:]
        tau = ordered.gather(1, reached.int().argmax(dim=1, keepdim=True))  # the first index that reaches
        keep &= s >= torch.where(reached.any(dim=1, keepdim=True), tau, float("-inf"))
    return keep


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
    """Kernel interface. logits [G*B, V] fp32 / fp16 / bfloat16 with G = len(scales) + 1; 0 <= lo < hi <= V;
    temperature >= 0; top_k >= 0 (0 = off); top_p in (0, 1] (1.0 = off); seed in [0, 2^32); offset None or
    int64 [1] on logits' device; out None or int64 [B] to write. Returns ids [B] int64 in [lo, hi).
    Scales, temperature and top_p take effect as fp32 values, as in the kernels."""
    temperature, top_p = (torch.tensor(x, dtype=torch.float32).item() for x in (temperature, top_p))  # as kernels
    z = guided_scores(logits, scales, log_softmax)[:, lo:hi]
    if temperature == 0:
        ids = z.argmax(dim=1)
    else:
        # A tensor divisor, not a Python scalar: CUDA divides by a scalar as a multiply by its reciprocal.
        s = z / torch.tensor([temperature], dtype=torch.float32, device=z.device)
        noise = race_noise(seed, offset, z.shape[0], lo, hi, z.device)
        keys = (s + noise).masked_fill(~kept_mask(s, top_k, top_p), float("-inf"))
        ids = keys.argmax(dim=1)
    ids = ids + lo
    return ids if out is None else out.copy_(ids)
