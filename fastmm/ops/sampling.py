"""Op family `sampling`: fused classifier-free-guidance sampling of image tokens, with no host sync.

Image generation in Janus, LlamaGen, Emu3 and Chameleon runs the decoder on G stacked copies of the batch
(conditional, unconditional, ...), and every step mixes their logits, applies temperature, top-k and top-p and
samples: several eager PyTorch ops, a sort for top-p and a torch.multinomial per step. ``cfg_sample`` does it
in one kernel per row and reads its RNG offset on the device, so the step it belongs to can be captured once
as a CUDA graph (or compiled with torch.compile(fullgraph=True)) and replayed while the caller increments the
offset in place. Semantics, tie rules and RNG: fastmm.reference.sampling.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import torch

from fastmm import _validate as v
from fastmm.ops._spec import kernel_op
from fastmm.reference import sampling as reference
from fastmm.reference.sampling import MIXES

Tensor = torch.Tensor
_MAX_GROUPS = 3


@kernel_op("sampling", "cfg_sample", writes_out=True)
def cfg_sample_fwd(
    logits: Tensor,
    scales: list[float],
    temperature: float,
    top_k: int,
    top_p: float,
    lo: int,
    hi: int,
    log_softmax: bool,
    seed: int,
    offset: Optional[Tensor],
) -> Tensor:
    return logits.new_empty(logits.shape[0] // (len(scales) + 1), dtype=torch.int64)


# The checks below run at every decode step: exact types first, the abstract ones (numpy scalars) only after.
def _is_real(value: object) -> bool:
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _is_int(value: object) -> bool:
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def _check_scales(op: str, scales: object) -> tuple[float, ...]:
    sequence = type(scales) in (tuple, list) or (isinstance(scales, Sequence) and not isinstance(scales, str))
    if not sequence or len(scales) >= _MAX_GROUPS or not all(_is_real(s) and math.isfinite(s) for s in scales):
        raise ValueError(
            f"{op}: scales must be a sequence of 0 to {_MAX_GROUPS - 1} finite floats (G = len(scales) + 1 groups), "
            f"got {scales!r}"
        )
    return tuple(float(s) for s in scales)


def _check_logits(op: str, logits: object, groups: int) -> None:
    v.check_tensor(op, "logits", logits)
    v.check_float(op, "logits", logits)
    v.check_dim(op, "logits", logits, 2, "[G*B, V] (G groups of B rows, group-major)")
    rows, vocab = logits.shape
    if rows < groups or rows % groups or vocab < 1:
        raise ValueError(
            f"{op}: logits must be [G*B, V] with B >= 1 and V >= 1 for G = len(scales) + 1 = {groups} groups, "
            f"got {v.describe(logits)}"
        )


def _check_options(op: str, temperature, top_k, top_p, mix, seed) -> None:
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{op}: temperature must be a finite float >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"{op}: top_k must be None or an int >= 0 (None or 0: off), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"{op}: top_p must be None or a float in (0, 1] (None or 1.0: off), got {top_p!r}")
    if mix not in MIXES:
        raise ValueError(f"{op}: mix must be one of {MIXES}, got {mix!r}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"{op}: seed must be an int in [0, 2^32), got {seed!r}")


def _check_allowed(op: str, allowed: object, vocab: int) -> tuple[int, int]:
    if allowed is None:
        return 0, vocab
    if (not isinstance(allowed, Sequence) or len(allowed) != 2 or not all(_is_int(bound) for bound in allowed)
            or not 0 <= allowed[0] < allowed[1] <= vocab):  # fmt: skip
        raise ValueError(
            f"{op}: allowed must be None or (lo, hi) ints with 0 <= lo < hi <= V = {vocab}, got {allowed!r}"
        )
    return int(allowed[0]), int(allowed[1])


def _check_buffers(op: str, logits: torch.Tensor, batch: int, offset: object, out: object) -> None:
    if offset is not None:
        v.check_tensor(op, "offset", offset)
        if offset.dtype != torch.int64:
            raise TypeError(f"{op}: offset must be an int64 tensor, got {offset.dtype}")
        v.check_shape(op, "offset", offset, (1,), "the RNG offset, read on the device")
    if out is not None:
        v.check_tensor(op, "out", out)
        if out.dtype != torch.int64:
            raise TypeError(f"{op}: out must be an int64 tensor, got {out.dtype}")
        v.check_shape(op, "out", out, (batch,), "[B]: one id per row of a group")
        if not out.is_contiguous():
            raise ValueError(f"{op}: out must be contiguous, got strides {out.stride()}")
    v.check_same_device(op, "logits", logits, offset=offset, out=out)


def cfg_sample(
    logits: torch.Tensor,
    scales: Sequence[float] = (),
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: tuple[int, int] | None = None,
    mix: str = "logits",
    seed: int = 0,
    offset: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sampled id per batch row from G stacked groups of logits mixed by classifier-free guidance.

    Groups are stacked group-major, most conditioned first. For B = 2 images and G = 2 (Janus):

        row 0   conditional    image 0
        row 1   conditional    image 1
        row 2   unconditional  image 0
        row 3   unconditional  image 1

    Args:
        logits: [G*B, V] float32 / float16 / bfloat16 (math in fp32); G = len(scales) + 1.
        scales: () for no guidance (G = 1); (s,) for u + s (c - u) (Janus, LlamaGen, Emu3: transformers'
            ClassifierFreeGuidanceLogitsProcessor bit for bit in fp32); (s_txt, s_img) for Chameleon's
            u + s_img (i - u) + s_txt (c - i) with groups (c, i, u). In general g_last + sum_j s_j (g_j - g_j+1).
        temperature: 0 for greedy (argmax, lowest id on ties); else the scores are divided by it.
        top_k: keep the k highest scores (ties with the k-th all kept); None or 0: off.
        top_p: then keep the fewest highest-probability ids whose mass reaches top_p (ties at the threshold
            all kept, at least one id); None or 1.0: off.
        allowed: (lo, hi): only ids in [lo, hi) can be chosen (the image vocabulary of a shared vocabulary);
            the returned ids are absolute.
        mix: "logits" mixes raw logits (Janus, Chameleon); "log_softmax" mixes each group's log-softmax over
            all V ids (Emu3).
        seed: int in [0, 2^32). The same (seed, offset) draws the same ids on every backend.
        offset: None (step 0) or int64 [1] on logits' device, read by the kernel, never on the host. The op does
            not change it: a decode loop increments it in place (offset += 1) so that every step draws anew.
        out: optional int64 [B] on logits' device to write the ids into (no allocation per step).

    Returns:
        ids [B] int64 (``out`` when given). A NaN score never wins (treated as -inf); NaN logits are not
        checked for, to keep the decode step free of host syncs.

    Example (Janus-style generation step)::

        ids = cfg_sample(logits, scales=(5.0,), temperature=1.0, top_p=0.9, seed=42, offset=step, out=ids)
        step += 1
    """
    op = "cfg_sample"
    scales = _check_scales(op, scales)
    _check_logits(op, logits, len(scales) + 1)
    batch = logits.shape[0] // (len(scales) + 1)
    _check_options(op, temperature, top_k, top_p, mix, seed)
    lo, hi = _check_allowed(op, allowed, logits.shape[1])
    _check_buffers(op, logits, batch, offset, out)
    temperature, top_k, top_p = float(temperature), int(top_k or 0), float(1.0 if top_p is None else top_p)
    log_softmax, seed = mix == "log_softmax", int(seed)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()  # kernels read rows with unit stride
    return cfg_sample_fwd(logits, scales, temperature, top_k, top_p, lo, hi, log_softmax, seed, offset, out=out)


# The initial drafts of new window slots (random or copied), for layers above ops: the reference's definition.
jacobi_initial_drafts = reference.jacobi_initial_drafts


# Declared optional so that a backend may leave it out and run the reference's; native and triton have their own.
@kernel_op("sampling", "jacobi_verify", optional=True)
def jacobi_verify_fwd(
    logits: Tensor,
    drafts: Tensor,
    draft_probs: Tensor,
    start: Tensor,
    limit: int,
    scales: list[float],
    temperature: float,
    top_k: int,
    top_p: float,
    lo: int,
    hi: int,
    log_softmax: bool,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(start), torch.empty_like(drafts), torch.empty_like(draft_probs)


def jacobi_verify(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    start: torch.Tensor,
    limit: int,
    scales: Sequence[float] = (),
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed: tuple[int, int] | None = None,
    mix: str = "logits",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One verification of speculative Jacobi decoding (SJD): which drafts of a window the pass's logits accept.

    Per image b and window slot t (token position start[b] + t), p is the distribution cfg_sample would sample
    from these logits (guidance, temperature, top-k, top-p as there) and q = draft_probs[b, t] the one draft d
    was drawn from. Slots are tested in order: accept iff u < min(1, p(d) / q(d)); the first rejected slot takes
    a draw from normalize(max(0, p - q)) instead and ends the accepted run; positions >= limit are never taken.
    Later slots are redrafted from their p (the Jacobi update). Each accepted token is an exact sample of the
    sequential conditional (lossless); at temperature 0 it is exact greedy Jacobi decoding. Random numbers are
    keyed by (seed, position, image, use), so a position draws the same numbers in every iteration and a draft
    takes the noise sequential cfg_sample takes there (fastmm.reference.sampling, "speculative Jacobi").

    Args:
        logits: [G*N, W, V] the window's logits, G guidance groups stacked group-major as in cfg_sample.
        drafts: [N, W] int64 absolute ids in allowed = [lo, hi). draft_probs: [N, W, hi - lo] fp32, each
            draft's q (rows sum to 1). start: [N] int64 position of slot 0. limit: positions < limit exist.
        scales, temperature, top_k, top_p, allowed, mix, seed: as cfg_sample.

    Returns:
        (count [N] int64 new tokens in 0..W, tokens [N, W] int64: the new tokens in slots < count and the
        redrafts after them, probs [N, W, hi - lo] fp32: the redrafts' q, zeros in slots < count).
    """
    op = "jacobi_verify"
    scales = _check_scales(op, scales)
    G = len(scales) + 1
    v.check_tensor(op, "logits", logits)
    v.check_float(op, "logits", logits)
    v.check_dim(op, "logits", logits, 3, "[G*N, W, V]")
    for name, t in (("drafts", drafts), ("start", start)):
        v.check_tensor(op, name, t)
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be an int64 tensor, got {t.dtype}")
    v.check_dim(op, "drafts", drafts, 2, "[N, W]")
    N, W = drafts.shape
    if logits.shape[0] != G * N or logits.shape[1] != W or N < 1 or W < 1:
        raise ValueError(f"{op}: logits must be [G*N, W, V] = [{G * N}, {W}, V] for drafts [N, W] = [{N}, {W}] "
                         f"and G = {G} groups, got {v.describe(logits)}")  # fmt: skip
    _check_options(op, temperature, top_k, top_p, mix, seed)
    lo, hi = _check_allowed(op, allowed, logits.shape[2])
    v.check_tensor(op, "draft_probs", draft_probs)
    if draft_probs.dtype != torch.float32:
        raise TypeError(f"{op}: draft_probs must be float32, got {draft_probs.dtype}")
    v.check_shape(op, "draft_probs", draft_probs, (N, W, hi - lo), "[N, W, hi - lo]: each draft's distribution")
    v.check_shape(op, "start", start, (N,), "[N]: the position of each image's first slot")
    if not _is_int(limit) or limit < 0:
        raise ValueError(f"{op}: limit must be an int >= 0, got {limit!r}")
    v.check_same_device(op, "logits", logits, drafts=drafts, draft_probs=draft_probs, start=start)
    v.check_id_range(op, "drafts - lo", drafts - lo, hi - lo, "hi - lo, the allowed ids")
    temperature, top_k, top_p = float(temperature), int(top_k or 0), float(1.0 if top_p is None else top_p)
    return jacobi_verify_fwd(logits.contiguous(), drafts.contiguous(), draft_probs.contiguous(), start.contiguous(),
                             int(limit), scales, temperature, top_k, top_p, lo, hi, mix == "log_softmax",
                             int(seed))  # fmt: skip
