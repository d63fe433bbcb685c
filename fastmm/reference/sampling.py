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


# ------------------------------------------------------------------------------- speculative Jacobi decoding
#
# SJD (Teng et al., ICLR 2025) verifies a window of W draft tokens per image with one decoder pass. For draft d
# at a position, p the processed distribution the pass gives there (guided, tempered, top-k / top-p: what
# cfg_sample samples from) and q the distribution d was drafted from: accept iff u < min(1, p(d) / q(d)); at the
# first rejection draw from normalize(max(0, p - q)) and stop. That is speculative sampling position by
# position, so every accepted token is an exact sample of the sequential conditional (lossless). Positions past
# the first rejection are redrafted from their new p (the Jacobi update), which becomes their q.
#
# Randomness is the counter-based hash of cfg_sample keyed by (seed, offset, image), with the token position
# as offset and one stream per use, so a position sees the same numbers in every iteration (MC-SJD's coupling):
#     stream 0: the race noise of drafts (the very noise sequential cfg_sample uses at that position)
#     stream 1: the acceptance uniform          stream 2: the race noise of the correction
#     stream 3: the race noise of random initial drafts (a race over equal scores: an exactly uniform draw)
# At temperature 0, p is one-hot at the argmax and the rule is exact Jacobi decoding: accept iff d is the argmax.

JACOBI_STREAMS = {"draft": 0, "accept": 1, "correction": 2, "init": 3}


def processed_probs(logits, scales, temperature, top_k, top_p, lo, hi, log_softmax) -> torch.Tensor:
    """p [B, hi - lo] fp32: the distribution cfg_sample_fwd samples from for logits [G*B, V] (one-hot at the
    argmax, the lowest id on ties, at temperature 0)."""
    temperature, top_p = (torch.tensor(x, dtype=torch.float32).item() for x in (temperature, top_p))
    z = guided_scores(logits, scales, log_softmax)[:, lo:hi]
    if temperature == 0:
        return torch.nn.functional.one_hot(z.argmax(dim=1), z.shape[1]).float()
    s = z / torch.tensor([temperature], dtype=torch.float32, device=z.device)
    return torch.softmax(s.masked_fill(~kept_mask(s, top_k, top_p), float("-inf")), dim=1)


def stream_bits(seed: int, positions: torch.Tensor, stream: int, ids: torch.Tensor | None) -> torch.Tensor:
    """32 random bits (int64) per (image b, window slot t) of positions [N, W], or per (b, t, id) for ids [n]:
    cfg_sample's hash with offset = position + stream * 2^32 and row b."""
    offsets = positions.long() + (stream << 32)
    state = hash32(torch.full_like(offsets, seed))
    state = hash32(hash32(state ^ (offsets & _MASK32)) ^ ((offsets >> 32) & _MASK32))
    key1 = hash32(state ^ torch.arange(positions.shape[0], device=positions.device)[:, None])
    key2 = hash32(key1 ^ _GOLDEN)
    if ids is None:
        return hash32(key1 ^ key2)
    return hash32(hash32(ids ^ key1[..., None]) ^ key2[..., None])


def race(log_weights: torch.Tensor, seed: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """argmax of log_weights [N, W, n] - log(E), E ~ Exp(1) from stream_bits: an exact draw from
    normalize(exp(log_weights)) per slot (the lowest index on ties). Returns [N, W] int64 indices."""
    ids = torch.arange(log_weights.shape[-1], device=log_weights.device)
    noise = -log_f32(exponential(stream_bits(seed, positions, stream, ids)))
    return (log_weights + noise).argmax(dim=-1)


def accepts(u: torch.Tensor, p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """The acceptance test u < min(1, p(d) / q(d)), as u q(d) < p(d) (q(d) > 0: d was drawn from q)."""
    return u * q_draft < p_draft


def jacobi_initial_drafts(kind: str, seed: int, positions: torch.Tensor, left: torch.Tensor, n: int):
    """Drafts for new window slots at positions [N, W] over n ids: "random" (uniform, drawn by a race over
    equal scores) or "copy" (the token to the left, left [N, W] as relative ids). Returns (ids [N, W] relative,
    their distributions q [N, W, n])."""
    N, W = positions.shape
    if kind == "random":
        ids = race(torch.zeros(N, W, n, device=positions.device), seed, positions, JACOBI_STREAMS["init"])
        return ids, torch.full((N, W, n), 1.0 / n, device=positions.device)
    return left, torch.nn.functional.one_hot(left, n).float()


def jacobi_verify_fwd(logits, drafts, draft_probs, start, limit, scales, temperature, top_k, top_p, lo, hi,
                      log_softmax, seed):  # fmt: skip
    """Kernel interface. logits [G*N, W, V] (the window's logits per CFG row, group-major as cfg_sample's);
    drafts [N, W] int64 absolute ids in [lo, hi) for positions start[b] + t; draft_probs [N, W, hi - lo] fp32,
    each draft's q; start [N] int64; limit an int (the last position + 1). Options as cfg_sample_fwd's.

    Returns (count [N] int64: new tokens 0..W (accepted drafts, then the correction, none at or past limit),
    tokens [N, W] int64: the new tokens in slots < count, after them the redrafted tokens of the later slots,
    probs [N, W, hi - lo] fp32: the redrafted slots' distributions, zeros in slots < count)."""
    G = len(scales) + 1
    N, W = drafts.shape
    V = logits.shape[-1]
    flat = logits.reshape(G, N * W, V).reshape(G * N * W, V)
    p = processed_probs(flat, scales, temperature, top_k, top_p, lo, hi, log_softmax).view(N, W, hi - lo)
    positions = start[:, None] + torch.arange(W, device=drafts.device)
    in_range = positions < limit
    relative = (drafts - lo)[..., None]
    u = (stream_bits(seed, positions, JACOBI_STREAMS["accept"], None).float() + 0.5) * 2.0**-32
    ok = accepts(u, p.gather(2, relative)[..., 0], draft_probs.gather(2, relative)[..., 0]) & in_range
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [N]: drafts accepted before the first rejection
    first = accepted.clamp(max=W - 1)
    corrects = (accepted < W) & in_range.gather(1, first[:, None])[:, 0]
    # A rejection means p(d) < q(d), so the residual has mass; log 0 = -inf never wins a race.
    correction = race(torch.log((p - draft_probs).clamp(min=0)), seed, positions, JACOBI_STREAMS["correction"])
    redraft = race(torch.log(p), seed, positions, JACOBI_STREAMS["draft"])
    slot = torch.arange(W, device=drafts.device)[None, :]
    tokens = torch.where(slot < accepted[:, None], drafts - lo, redraft)
    at_first = (slot == accepted[:, None]) & corrects[:, None]
    tokens = torch.where(at_first, correction, tokens) + lo
    count = accepted + corrects.long()
    probs = p.masked_fill((slot < count[:, None])[..., None], 0.0)
    return count, tokens, probs
