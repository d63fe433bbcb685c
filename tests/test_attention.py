"""Op family `attention`: key ranges, span attention and decode attention on every backend, against the
dense fp32 reference, under the error-ratio rule."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_error_ratio

import fastmm
from fastmm.reference import attention as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, Hq, Hkv, L, d, dtype, device, seed=0, S=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, d, generator=gen)
    k = torch.randn(B, Hkv, S or L, d, generator=gen)
    v = torch.randn(B, Hkv, S or L, d, generator=gen)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def _truth(q, k, v, kv_start, kv_end):
    return ref.span_attention(q.double(), k.double(), v.double(), kv_start, kv_end, q.shape[-1] ** -0.5)


def _layout(B, L, seed):
    """A random layout per row: documents of random length, each with a random image span or none."""
    gen = torch.Generator().manual_seed(seed)
    docs = torch.zeros(B, L, dtype=torch.int64)
    modality = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        pos, doc = 0, 0
        while pos < L:
            length = int(torch.randint(1, L + 1, (1,), generator=gen))
            docs[b, pos : pos + length] = doc
            start = pos + int(torch.randint(0, length, (1,), generator=gen))
            stop = start + int(torch.randint(0, pos + length - start + 1, (1,), generator=gen))
            modality[b, start:stop] = 1
            pos, doc = pos + length, doc + 1
    return fastmm.ops.key_ranges(modality=modality, doc_ids=docs)


# ------------------------------------------------------------------------------------------ key_ranges


def test_key_ranges_text_image_text():
    """The mask picture of fastmm.reference.attention: causal text, the image span sees itself whole."""
    kv_start, kv_end = fastmm.ops.key_ranges(modality=torch.tensor([[0, 1, 1, 1, 0]]))
    assert kv_start.dtype == torch.int32 and kv_start.tolist() == [[0, 0, 0, 0, 0]]
    assert kv_end.tolist() == [[1, 4, 4, 4, 5]]


def test_key_ranges_documents_cut_spans_and_reset_starts():
    modality = torch.tensor([[0, 1, 1, 1, 1, 0]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    kv_start, kv_end = fastmm.ops.key_ranges(modality=modality, doc_ids=docs)
    assert kv_start.tolist() == [[0, 0, 0, 3, 3, 3]]
    assert kv_end.tolist() == [[1, 3, 3, 5, 5, 6]]
    kv_start, kv_end = fastmm.ops.key_ranges(doc_ids=docs, causal=False)
    assert kv_start.tolist() == [[0, 0, 0, 3, 3, 3]] and kv_end.tolist() == [[3, 3, 3, 6, 6, 6]]


def test_key_ranges_explicit_spans_match_modality():
    spans = [[(1, 3), (3, 5)], []]  # two adjacent spans stay two spans; a row without any
    kv_start, kv_end = fastmm.ops.key_ranges(spans=spans, length=6)
    assert kv_end.tolist() == [[1, 3, 3, 5, 5, 6], [1, 2, 3, 4, 5, 6]]
    assert kv_start.eq(0).all()
    empty = fastmm.ops.key_ranges(spans=[[(2, 2)]], length=4)
    assert empty[1].tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize(
    "label,kwargs,words",
    [
        ("both", {"modality": torch.zeros(1, 3, dtype=torch.long), "spans": [[]]}, ["modality", "spans"]),
        ("nothing", {}, ["modality", "doc_ids", "length"]),
        ("span out of row", {"spans": [[(1, 9)]], "length": 4}, ["spans[0]", "(1, 9)", "L = 4"]),
        ("overlap", {"spans": [[(0, 3), (2, 4)]], "length": 4}, ["spans[0]", "overlap"]),
        ("float modality", {"modality": torch.zeros(1, 3)}, ["modality", "integer"]),
        ("doc shape", {"modality": torch.zeros(1, 3, dtype=torch.long), "doc_ids": torch.zeros(1, 4, dtype=torch.long)},
         ["doc_ids", "(1, 3)"]),
    ],
)  # fmt: skip
def test_key_ranges_bad_input(label, kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        fastmm.ops.key_ranges(**kwargs)
    for word in words:
        assert word in str(info.value), f"{label}: {str(info.value)!r} lacks {word!r}"


# ------------------------------------------------------------------------------------- span_attention


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("L,d,Hq,Hkv", [(1, 64, 2, 2), (17, 64, 4, 2), (70, 80, 2, 1), (130, 128, 2, 2), (33, 96, 4, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_span_attention_layouts(backend, device, L, d, Hq, Hkv, dtype):
    q, k, v = _qkv(2, Hq, Hkv, L, d, dtype, device, seed=L)
    kv_start, kv_end = _layout(2, L, seed=L)
    kv_start, kv_end = kv_start.to(device), kv_end.to(device)
    with fastmm.use_backend(backend):
        out = fastmm.ops.span_attention(q, k, v, kv_start, kv_end)
    baseline = ref.span_attention(q, k, v, kv_start, kv_end)
    assert out.dtype == dtype
    assert_error_ratio("span_attention", out, baseline, _truth(q, k, v, kv_start, kv_end))


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_span_attention_special_ranges(backend, device, dtype):
    """Plain causal (no ranges), one span covering the whole row (bidirectional), and empty ranges (zeros)."""
    L = 40
    q, k, v = _qkv(1, 2, 2, L, 64, dtype, device, seed=7)
    whole = fastmm.ops.key_ranges(modality=torch.ones(1, L, dtype=torch.long))
    empty = (torch.tensor([[5] * L], dtype=torch.int32), torch.tensor([[5] * 20 + [L] * 20], dtype=torch.int32))
    with fastmm.use_backend(backend):
        causal_out = fastmm.ops.span_attention(q, k, v)
        whole_out = fastmm.ops.span_attention(q, k, v, *[t.to(device) for t in whole])
        empty_out = fastmm.ops.span_attention(q, k, v, *[t.to(device) for t in empty])
    causal = ref.key_ranges(doc_ids=torch.zeros(1, L, dtype=torch.long))
    for label, out, ranges in (("causal", causal_out, causal), ("whole span", whole_out, whole), ("empty", empty_out, empty)):
        ranges = [t.to(device) for t in ranges]
        baseline = ref.span_attention(q, k, v, *ranges)
        assert_error_ratio(label, out, baseline, _truth(q, k, v, *ranges))
    assert empty_out[:, :, :20].eq(0).all(), "queries with an empty key range must output zeros"


@pytest.mark.parametrize("backend,device", backend_cases())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(L=st.integers(1, 300), seed=st.integers(0, 2**16), gqa=st.booleans())
def test_span_attention_property_random_layouts(backend, device, L, seed, gqa):
    if backend == "triton" and device == "cpu":
        L = min(L, 64)  # the interpreter runs every program in Python
    q, k, v = _qkv(1, 4, 2 if gqa else 4, L, 64, torch.float32, device, seed=seed)
    kv_start, kv_end = [t.to(device) for t in _layout(1, L, seed)]
    with fastmm.use_backend(backend):
        out = fastmm.ops.span_attention(q, k, v, kv_start, kv_end)
    baseline = ref.span_attention(q, k, v, kv_start, kv_end)
    assert_error_ratio(f"L={L} seed={seed}", out, baseline, _truth(q, k, v, kv_start, kv_end))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_span_attention_backward(backend, device):
    """Gradients through the registered backward (a backend kernel or the reference recompute) equal
    autograd through the dense reference, GQA included."""
    q, k, v = _qkv(2, 4, 2, 23, 32, torch.float32, device, seed=8)
    kv_start, kv_end = [t.to(device) for t in _layout(2, 23, seed=8)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((fn(*leaves, kv_start, kv_end) * grad).sum(), leaves)

    with fastmm.use_backend(backend):
        ours = grads(fastmm.ops.span_attention)
    expected = grads(ref.span_attention)
    for name, a, b in zip(("dq", "dk", "dv"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------- decode_attention


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_equals_prefill_rows(backend, device, Lq, dtype):
    """Decode of the last Lq tokens against a cache (rows of different lengths, S not a multiple of any
    split) equals those rows of causal span attention over the prefix."""
    S, lengths = 77, [77, 40, 5]
    q_all, k_cache, v_cache = _qkv(3, 4, 2, S, 64, dtype, device, seed=10)
    q = torch.stack([q_all[b, :, n - Lq : n] for b, n in enumerate(lengths)])
    cache_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    with fastmm.use_backend(backend):
        out = fastmm.ops.decode_attention(q, k_cache, v_cache, cache_len)
    assert out.shape == q.shape and out.dtype == dtype
    spec = ref.decode_attention(q, k_cache, v_cache, cache_len)
    for b, n in enumerate(lengths):
        qb, kb, vb = q_all[b : b + 1, :, :n], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
        baseline = spec[b : b + 1]
        truth = ref.span_attention(qb.double(), kb.double(), vb.double())[:, :, n - Lq :]
        assert_error_ratio(f"row {b} (cache_len {n})", out[b : b + 1], baseline, truth)


# ------------------------------------------------------------------------------------- bad input, contract


BAD_INPUTS = [
    ("head dim", lambda q, k, v, r: fastmm.ops.span_attention(q, k[..., :32], v[..., :32]), ["head dim", "d = 64"]),
    ("gqa", lambda q, k, v, r: fastmm.ops.span_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3]),
     ["Hq = 4", "Hkv = 3"]),
    ("range shape", lambda q, k, v, r: fastmm.ops.span_attention(q, k, v, r[0][:, :5], r[1][:, :5]),
     ["kv_start", "[B, Lq]"]),
    ("one range", lambda q, k, v, r: fastmm.ops.span_attention(q, k, v, r[0], None), ["kv_start and kv_end"]),
    ("inverted", lambda q, k, v, r: fastmm.ops.span_attention(q, k, v, r[1], r[0]), ["kv_end must be >= kv_start"]),
    ("outside", lambda q, k, v, r: fastmm.ops.span_attention(q, k, v, r[0], r[1] + 1), ["[0, S = 9]"]),
    ("dtype", lambda q, k, v, r: fastmm.ops.span_attention(q, k.double(), v), ["k", "float32"]),
    ("cache_len above S", lambda q, k, v, r: fastmm.ops.decode_attention(q[:, :, :1], k, v, torch.tensor([10, 9])),
     ["cache_len", "S = 9", "[9, 10]"]),
    ("cache_len below Lq", lambda q, k, v, r: fastmm.ops.decode_attention(q[:, :, :2], k, v, torch.tensor([1, 9])),
     ["cache_len", "Lq = 2"]),
]  # fmt: skip


@pytest.mark.parametrize("label,call,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_attention_bad_input_names_the_argument(label, call, words):
    q, k, v = _qkv(2, 4, 2, 9, 64, torch.float32, "cpu")
    ranges = ref.key_ranges(doc_ids=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises((ValueError, TypeError)) as info:
        call(q, k, v, ranges)
    for word in words:
        assert word in str(info.value), f"{label}: {str(info.value)!r} lacks {word!r}"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_attention_opcheck_and_compile(backend, device):
    q, k, v = _qkv(1, 2, 1, 12, 16, torch.float32, device, seed=11)
    kv_start, kv_end = [t.to(device) for t in _layout(1, 12, seed=11)]
    cache_len = torch.tensor([12], dtype=torch.int32, device=device)
    with fastmm.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.library.opcheck(torch.ops.fastmm.span_attention.default, (*leaves, kv_start, kv_end, 0.25, None, None, 0.0))
        torch.library.opcheck(torch.ops.fastmm.decode_attention.default, (q[:, :, -1:], k, v, cache_len, 0.25, None, 0.0))
        torch._dynamo.reset()

        def step(q, k, v, kv_start, kv_end, cache_len):
            return fastmm.ops.span_attention(q, k, v, kv_start, kv_end), fastmm.ops.decode_attention(
                q[:, :, -1:], k, v, cache_len
            )

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        out, last = compiled(q, k, v, kv_start, kv_end, cache_len)
        eager_out, eager_last = step(q, k, v, kv_start, kv_end, cache_len)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(last, eager_last)
