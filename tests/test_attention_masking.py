"""Op family `attention`, masking arguments: queries against more keys than queries (Lq < S), key padding
(key_keep), any boolean or additive mask, logit softcapping and attention sinks, on every backend, against an
fp64 formula written out here (not the reference module) and, for the reference itself, against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, Hq, Hkv, Lq, S, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=gen) for h, n in ((Hq, Lq), (Hkv, S), (Hkv, S)))
    start = torch.randint(0, S, (B, Lq), generator=gen)
    end = (start + torch.randint(0, S, (B, Lq), generator=gen)).clamp_max(S)
    start[:, 0] = end[:, 0] = 1  # an empty range
    keep = torch.rand(B, S, generator=gen) > 0.2
    allowed = torch.rand(B, Lq, S, generator=gen) > 0.3
    allowed[:, -1] = False  # a query the mask drops entirely
    bias = torch.randn(B, Lq, S, generator=gen)
    bias[:, Lq // 2, ::3] = float("-inf")
    return [t.to(dtype) for t in (q, k, v)], start.int(), end.int(), keep, allowed, bias


def _formula(q, k, v, start, end, keep=None, mask=None, softcap=None, sinks=None):
    """fp64 attention written out: logits, cap, bias, mask, softmax with an optional sink column."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    j = torch.arange(k.shape[2])
    allowed = (j >= start[..., None]) & (j < end[..., None])
    if keep is not None:
        allowed = allowed & keep[:, None, :]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        logits = logits + mask[:, None].double()
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.double()[None, :, None, None].expand(*logits.shape[:3], 1)], -1)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)[..., : k.shape[2]]
    return probs @ v


CASES = {
    "ranges": {},
    "key_keep": {"keep": True},
    "bool mask": {"mask": "bool"},
    "float mask": {"mask": "float"},
    "softcap": {"softcap": 5.0},
    "all": {"keep": True, "mask": "bool", "softcap": 3.0},
    "sinks": {"sinks": True, "mask": "float"},
}


def _arguments(case, keep, allowed, bias, Hq):
    kwargs = {}
    if case.get("keep"):
        kwargs["key_keep"] = keep
    if case.get("mask"):
        kwargs["mask"] = allowed if case["mask"] == "bool" else bias
    if case.get("softcap"):
        kwargs["softcap"] = case["softcap"]
    if case.get("sinks"):
        kwargs["sinks"] = torch.linspace(-1, 2, Hq)
    return kwargs


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("Lq,S", [(9, 9), (5, 23), (1, 17)])
def test_span_attention_masking_matches_formula(backend, device, dtype, case, Lq, S):
    (q, k, v), start, end, keep, allowed, bias = _inputs(2, 4, 2, Lq, S, 16, dtype, seed=Lq * S)
    kwargs = _arguments(CASES[case], keep, allowed, bias, 4)
    truth = _formula(q, k, v, start, end, kwargs.get("key_keep"), kwargs.get("mask"), kwargs.get("softcap"),
                     kwargs.get("sinks"))  # fmt: skip
    with fastmm.use_backend("reference"):
        baseline = fastmm.ops.span_attention(q, k, v, start, end, **kwargs)
    on = {name: t.to(device) for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
    with fastmm.use_backend(backend):
        out = fastmm.ops.span_attention(q.to(device), k.to(device), v.to(device), start.to(device),
                                        end.to(device), **{**kwargs, **on})  # fmt: skip
    assert_error_ratio(f"{backend} {case} Lq={Lq} S={S}", out, baseline, truth)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("case", ["ranges", "bool mask", "float mask", "softcap", "sinks"])
def test_decode_attention_masking_matches_formula(backend, device, case):
    Lq, S = 3, 40
    (q, k, v), _, _, keep, allowed, bias = _inputs(2, 4, 2, Lq, S, 16, torch.float32, seed=5)
    cache_len = torch.tensor([S, 29])
    kwargs = _arguments({**CASES[case], "keep": False}, keep, allowed, bias, 4)
    start = torch.zeros(2, Lq, dtype=torch.int32)
    end = (cache_len[:, None] - Lq + torch.arange(Lq) + 1).int()
    truth = _formula(q, k, v, start, end, None, kwargs.get("mask"), kwargs.get("softcap"), kwargs.get("sinks"))
    with fastmm.use_backend("reference"):
        baseline = fastmm.ops.decode_attention(q, k, v, cache_len, **kwargs)
    on = {name: t.to(device) for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
    with fastmm.use_backend(backend):
        out = fastmm.ops.decode_attention(q.to(device), k.to(device), v.to(device), cache_len.to(device),
                                          **{**kwargs, **on})  # fmt: skip
    assert_error_ratio(f"{backend} decode {case}", out, baseline, truth)


def test_reference_float_mask_matches_sdpa_including_fully_masked_rows():
    """An additive mask with transformers' finfo.min rows (SDPA averages every key) and -inf rows (SDPA gives
    zeros): the reference agrees with SDPA once the ops layer floors the mask."""
    (q, k, v), _, _, _, _, bias = _inputs(1, 2, 2, 6, 6, 8, torch.float32, seed=3)
    bias[:, 2] = torch.finfo(torch.float32).min
    bias[:, 4] = float("-inf")
    full = torch.zeros(1, 6, dtype=torch.int32), torch.full((1, 6), 6, dtype=torch.int32)
    with fastmm.use_backend("reference"):
        out = fastmm.ops.span_attention(q, k, v, *full, mask=bias)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out[:, :, 4].abs().max() == 0


@pytest.mark.parametrize("backend,device", backend_cases())
def test_span_attention_masking_backward(backend, device):
    """Gradients of q, k, v and the sinks under a mask, key padding and softcap, against autograd through the
    fp64 formula."""
    (q, k, v), start, end, keep, allowed, _ = _inputs(1, 4, 2, 6, 11, 8, torch.float32, seed=7)
    sinks = torch.linspace(-1, 1, 4)
    leaves = [t.clone().double().requires_grad_() for t in (q, k, v, sinks)]
    _formula(*leaves[:3], start, end, keep, allowed, 2.0, leaves[3]).square().sum().backward()
    ours = [t.clone().to(device).requires_grad_() for t in (q, k, v, sinks)]
    with fastmm.use_backend(backend):
        out = fastmm.ops.span_attention(*ours[:3], start.to(device), end.to(device), key_keep=keep.to(device),
                                        mask=allowed.to(device), softcap=2.0, sinks=ours[3])  # fmt: skip
        out.square().sum().backward()
    for name, mine, truth in zip("qkvs", ours, leaves):
        torch.testing.assert_close(mine.grad.double().cpu(), truth.grad, rtol=1e-4, atol=1e-4, msg=name)


BAD_MASKING = [
    ("key_keep dtype", {"key_keep": torch.ones(2, 9)}, ["key_keep", "bool"]),
    ("key_keep shape", {"key_keep": torch.ones(2, 8, dtype=torch.bool)}, ["key_keep", "(2, 9)"]),
    ("mask shape", {"mask": torch.ones(2, 1, 9, dtype=torch.bool)}, ["mask", "[B, Lq, S]"]),
    ("mask dtype", {"mask": torch.ones(2, 9, 9, dtype=torch.int32)}, ["mask", "bool", "float"]),
    ("softcap", {"softcap": -1.0}, ["softcap", "> 0"]),
    ("sinks", {"sinks": torch.zeros(3)}, ["sinks", "[Hq]"]),
    ("mask grad", {"mask": torch.zeros(2, 9, 9, requires_grad=True)}, ["mask", "requires grad"]),
]  # fmt: skip


@pytest.mark.parametrize("label,kwargs,words", BAD_MASKING, ids=[case[0] for case in BAD_MASKING])
def test_masking_bad_input_names_the_argument(label, kwargs, words):
    (q, k, v), *_ = _inputs(2, 4, 2, 9, 9, 16, torch.float32)
    with pytest.raises((ValueError, TypeError)) as info:
        fastmm.ops.span_attention(q, k, v, **kwargs)
    for word in words:
        assert word in str(info.value), f"{label}: {str(info.value)!r} lacks {word!r}"


def test_more_queries_than_keys_is_refused():
    (q, k, v), *_ = _inputs(1, 2, 2, 5, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="Lq = 5.*S = 3"):
        fastmm.ops.span_attention(q, k, v)
