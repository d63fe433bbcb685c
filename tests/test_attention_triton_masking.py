"""Triton attention kernels with masking (Lq < S, key_keep, bool / float masks, softcap, a gradient on lse),
called through their kernel interface (fastmm.triton.attention) under TRITON_INTERPRET=1 on CPU (on CUDA
tensors when a GPU is present) and held to the error-ratio rule: the truth is an fp64 softmax written out
here, the baseline the reference's kernel interface at the input dtype. The reference itself is checked
against the same fp64 formula, so the chain does not rest on the reference alone."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_error_ratio

from fastmm.reference import attention as ref

triton_attention = pytest.importorskip("fastmm.triton.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------- inputs, fp64


def _qkv(B, Hq, Hkv, Lq, S, d, dtype, gen):
    q, k, v = (torch.randn(B, h, n, d, generator=gen) for h, n in ((Hq, Lq), (Hkv, S), (Hkv, S)))
    return [t.to(dtype) for t in (q, k, v)]


def _ranges(B, Lq, S, kind, gen):
    """[B, Lq] int32 ranges over S keys. causal: the queries are the last Lq of S positions, each with a random
    window start; random: arbitrary intervals, query 0 of every row empty."""
    if kind == "causal":
        end = (torch.arange(S - Lq + 1, S + 1)).expand(B, Lq)
        start = (end - 1 - torch.randint(0, S, (B, Lq), generator=gen)).clamp_min(0)
    else:
        start = torch.randint(0, S, (B, Lq), generator=gen)
        end = (start + torch.randint(0, S, (B, Lq), generator=gen)).clamp_max(S)
        start[:, 0] = end[:, 0] = S // 2
    return start.int().contiguous(), end.int().contiguous()


def _masking(kind, B, Lq, S, gen):
    """(key_keep, mask) of one masking kind. Row b = B - 1 of key_keep is all padding; the bool mask drops
    query 1 entirely; float masks are as the ops layer hands them on (floored, see ref.MASK_FLOOR)."""
    key_keep = mask = None
    if "keep" in kind:
        key_keep = torch.rand(B, S, generator=gen) > 0.25
        key_keep[-1] = False
    if "bool" in kind:
        mask = torch.rand(B, Lq, S, generator=gen) > 0.3
        mask[:, 1] = False
    if "moderate" in kind:  # 0 or -1e4 per pair, and a query whose every logit sits at -1e4
        mask = torch.where(torch.rand(B, Lq, S, generator=gen) > 0.4, 0.0, -1e4)
        mask[:, 1] = -1e4
    if "floor" in kind:  # a row at the floor (every key counts the same), a -inf row, one of each mixed
        mask = torch.randn(B, Lq, S, generator=gen)
        mask[:, 1] = ref.MASK_FLOOR
        mask[:, 2] = NEG_INF
        mask[:, 3, ::2] = NEG_INF
        mask[:, 3, 1::2] = ref.MASK_FLOOR
        mask[0, 0, ::3] = torch.finfo(torch.float32).min  # as transformers writes it: floored by the ops layer
        mask = ref.floor_mask(mask)
    return key_keep, mask


def _allowed(start, end, S, key_keep=None, mask=None):
    """[B, Lq, S] bool written out: in range, kept, and allowed by a bool mask."""
    j = torch.arange(S)
    allowed = (j >= start[..., None].long()) & (j < end[..., None].long())
    if key_keep is not None:
        allowed = allowed & key_keep[:, None, :]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    return allowed


def _fp64_attention(q, k, v, allowed, scale, mask=None, softcap=0.0):
    """(o, lse) in fp64: einsum logits, softcap, + a float mask, softmax over the allowed keys (o = 0 and
    lse = -inf where a query allows none, written with a safe division so that autograd stays finite)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None and mask.dtype != torch.bool:
        logits = logits + mask[:, None].double()
    allowed = allowed[:, None] & (logits > NEG_INF)
    logits = logits.masked_fill(~allowed, NEG_INF)
    row_max = logits.amax(-1, keepdim=True).detach()
    row_max = torch.where(row_max > NEG_INF, row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max) * allowed
    total = weights.sum(-1, keepdim=True)
    some = total > 0
    total = torch.where(some, total, torch.ones_like(total))
    o = torch.einsum("bhqk,bhkd->bhqd", weights / total, v)
    lse = torch.where(some, row_max + torch.log(total), torch.full_like(total, NEG_INF))[..., 0]
    return o, lse


def _fp64_grads(q, k, v, allowed, scale, mask, softcap, do, dlse):
    """(o, lse, dq, dk, dv) of the fp64 formula, the loss being sum(o * do) + sum(lse * dlse) over the queries
    that attend some key."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, lse = _fp64_attention(*leaves, allowed, scale, mask, softcap)
    finite = lse > NEG_INF
    loss = (o * do.double()).sum() + torch.where(finite, lse, torch.zeros_like(lse)).mul(dlse.double()).sum()
    return (o.detach(), lse.detach(), *torch.autograd.grad(loss, leaves))


def _assert_lse(name, out, baseline, truth):
    """-inf exactly where the truth is -inf; rows at the mask floor to fp32's relative precision; the rest by
    the error ratio (lse is fp32 whatever the input dtype)."""
    empty = truth == NEG_INF
    assert torch.equal(out.cpu() == NEG_INF, empty), f"{name}: -inf pattern differs from the truth"
    assert torch.equal(baseline.cpu() == NEG_INF, empty), f"{name}: reference -inf pattern differs"
    floor = truth < ref.MASK_FLOOR / 2
    torch.testing.assert_close(out.cpu()[floor].double(), truth[floor], rtol=1e-6, atol=0, msg=name)
    rest = ~empty & ~floor
    assert_error_ratio(name, out.cpu()[rest], baseline.cpu()[rest], truth[rest])


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# ------------------------------------------------------------------------------------- span attention

# (masking kind, dtype, d, Lq, S, range kind): every feature alone, then combined; fp32 everywhere, fp16 /
# bf16 on a few; d = 40 pads to BLOCK_D = 64, d = 100 to 128; S never a multiple of a key tile.
SPAN_CASES = [
    ("none", torch.float32, 64, 7, 37, "causal"),
    ("none", torch.float32, 40, 21, 21, "random"),
    ("keep", torch.float32, 40, 7, 37, "causal"),
    ("bool", torch.float32, 64, 21, 21, "random"),
    ("moderate", torch.float32, 40, 9, 37, "random"),
    ("floor", torch.float32, 64, 9, 37, "causal"),
    ("floor", torch.float32, 40, 19, 19, "random"),
    ("cap", torch.float32, 40, 19, 19, "causal"),
    ("keep+bool+cap", torch.float32, 64, 9, 45, "random"),
    ("keep+floor+cap", torch.float32, 40, 9, 45, "causal"),
    ("keep+bool+cap", torch.bfloat16, 40, 19, 19, "causal"),
    ("keep+moderate+cap", torch.float16, 64, 9, 45, "random"),
    ("floor", torch.bfloat16, 64, 9, 37, "random"),
    ("keep+floor+cap", torch.float32, 100, 40, 70, "causal"),  # several query tiles (backward: the reference)
    ("bool+cap", torch.bfloat16, 100, 21, 70, "random"),
]
CAPS = {True: 2.5, False: 0.0}


@pytest.mark.parametrize(
    "kind,dtype,d,Lq,S,ranges", SPAN_CASES,
    ids=[f"{c[0]}-{str(c[1])[6:]}-d{c[2]}-Lq{c[3]}-S{c[4]}-{c[5]}" for c in SPAN_CASES],
)  # fmt: skip
def test_span_attention_fwd_bwd_matches_fp64(kind, dtype, d, Lq, S, ranges):
    """o, lse, dq, dk, dv (with a nonzero dlse) of the Triton kernels, GQA Hq = 2 Hkv, against fp64."""
    B, Hq, Hkv = 2, 4, 2
    gen = torch.Generator().manual_seed(Lq * S + d)
    q, k, v = _qkv(B, Hq, Hkv, Lq, S, d, dtype, gen)
    start, end = _ranges(B, Lq, S, ranges, gen)
    key_keep, mask = _masking(kind, B, Lq, S, gen)
    softcap, scale = CAPS["cap" in kind], d**-0.5
    do = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(B, Hq, Lq, generator=gen)
    allowed = _allowed(start, end, S, key_keep, mask)
    truth = _fp64_grads(q, k, v, allowed, scale, mask, softcap, do, dlse)

    args = (start, end, scale, key_keep, mask, softcap)
    ref_o, ref_lse = ref.span_attention_fwd(q, k, v, *args)
    baseline = (ref_o, ref_lse, *ref.span_attention_bwd(do, q, k, v, ref_o, ref_lse, *args, dlse))
    q_, k_, v_, do_, dlse_, start_, end_, keep_, mask_ = _on(DEVICE, q, k, v, do, dlse, start, end, key_keep, mask)
    on_args = (start_, end_, scale, keep_, mask_, softcap)
    o, lse = triton_attention.span_attention_fwd(q_, k_, v_, *on_args)
    grads = triton_attention.span_attention_bwd(do_, q_, k_, v_, o, lse, *on_args, dlse_)

    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, t in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads)):
        assert not t.isnan().any(), f"{kind}: {name} has NaN"
    _assert_lse(f"{kind} lse", lse, ref_lse, truth[1])
    for name, out, base, true in zip(("o", "dq", "dk", "dv"), (o, *grads), baseline[:1] + baseline[2:],
                                     truth[:1] + truth[2:]):  # fmt: skip
        assert_error_ratio(f"{kind} {name}", out, base, true)
    # queries that attend no key: o = 0, lse = -inf, no gradient through them
    empty = truth[1] == NEG_INF
    assert empty.any() == (ranges == "random" or "keep" in kind or "bool" in kind or "floor" in kind)
    assert o.cpu()[empty].eq(0).all() and grads[0].cpu()[empty].eq(0).all()
    if key_keep is not None:  # the last row keeps no key: nothing flows to its keys and values
        assert grads[1].cpu()[-1].eq(0).all() and grads[2].cpu()[-1].eq(0).all()


# --------------------------------------------------------------------------------------- decode attention

DECODE_CASES = [
    ("none", torch.float32, 64),
    ("bool", torch.float32, 40),
    ("moderate", torch.float32, 64),
    ("floor+cap", torch.float32, 40),
    ("bool+cap", torch.bfloat16, 64),
    ("floor", torch.float16, 40),
]


@pytest.mark.parametrize("kind,dtype,d", DECODE_CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-d{c[2]}" for c in DECODE_CASES])
def test_decode_attention_fwd_matches_fp64(kind, dtype, d):
    """o and lse of the split + merge kernels, cache_len varying per row (a full cache, a middle one, the
    shortest allowed), the Lq queries being the last Lq cached tokens; splits cross tile boundaries."""
    B, Hq, Hkv, Lq, S = 3, 4, 2, 4, 45
    gen = torch.Generator().manual_seed(d)
    q, k, v = _qkv(B, Hq, Hkv, Lq, S, d, dtype, gen)
    cache_len = torch.tensor([S, 20, Lq], dtype=torch.int32)
    _, mask = _masking(kind, B, Lq, S, gen)
    softcap, scale = CAPS["cap" in kind], d**-0.5
    start = torch.zeros(B, Lq, dtype=torch.int32)
    end = (cache_len[:, None] - Lq + torch.arange(Lq) + 1).int()
    allowed = _allowed(start, end, S, None, mask)
    truth = _fp64_attention(q.double(), k.double(), v.double(), allowed, scale, mask, softcap)

    ref_o, ref_lse = ref.decode_attention_fwd(q, k, v, cache_len, scale, mask, softcap)
    q_, k_, v_, len_, mask_ = _on(DEVICE, q, k, v, cache_len, mask)
    o, lse = triton_attention.decode_attention_fwd(q_, k_, v_, len_, scale, mask_, softcap)

    assert o.dtype == dtype and not o.isnan().any() and not lse.isnan().any()
    _assert_lse(f"decode {kind} lse", lse, ref_lse, truth[1])
    assert_error_ratio(f"decode {kind} o", o, ref_o, truth[0])
    assert o.cpu()[truth[1] == NEG_INF].eq(0).all()


# --------------------------------------------------------------------------- the reference against fp64


@pytest.mark.parametrize("kind", ["keep+bool+cap", "floor+cap", "moderate"])
def test_reference_kernel_interface_matches_fp64(kind):
    """The oracle above is the reference; here the reference's own forward and backward (dlse included) meet
    the fp64 formula, to fp32 precision."""
    B, Hq, Hkv, Lq, S, d = 2, 4, 2, 6, 13, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(B, Hq, Hkv, Lq, S, d, torch.float32, gen)
    start, end = _ranges(B, Lq, S, "random", gen)
    key_keep, mask = _masking(kind, B, Lq, S, gen)
    softcap, scale = CAPS["cap" in kind], d**-0.5
    do, dlse = torch.randn(q.shape, generator=gen), torch.randn(B, Hq, Lq, generator=gen)
    truth = _fp64_grads(q, k, v, _allowed(start, end, S, key_keep, mask), scale, mask, softcap, do, dlse)

    args = (start, end, scale, key_keep, mask, softcap)
    o, lse = ref.span_attention_fwd(q, k, v, *args)
    ours = (o, lse, *ref.span_attention_bwd(do, q, k, v, o, lse, *args, dlse))
    # rows whose every logit sits at -1e4 keep fp32's 1e-3 of absolute rounding in each logit
    atol = 2e-3 if kind == "moderate" else 1e-5
    for name, mine, true in zip(("o", "lse", "dq", "dk", "dv"), ours, truth):
        torch.testing.assert_close(mine.double(), true, rtol=1e-5, atol=atol, msg=lambda m: f"{kind} {name}: {m}")


def test_reference_decode_matches_fp64():
    B, Hq, Hkv, Lq, S, d = 2, 4, 2, 4, 11, 8
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(B, Hq, Hkv, Lq, S, d, torch.float32, gen)
    cache_len = torch.tensor([S, 5], dtype=torch.int32)
    _, mask = _masking("floor", B, Lq, S, gen)
    end = (cache_len[:, None] - Lq + torch.arange(Lq) + 1).int()
    allowed = _allowed(torch.zeros_like(end), end, S, None, mask)
    truth = _fp64_attention(q.double(), k.double(), v.double(), allowed, 0.3, mask, 1.5)
    o, lse = ref.decode_attention_fwd(q, k, v, cache_len, 0.3, mask, 1.5)
    torch.testing.assert_close(o.double(), truth[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), truth[1], rtol=1e-6, atol=1e-5)
