"""Op family `prune`: attention_importance against the eager softmax probabilities (a dense fp64 softmax over the
same key ranges, the recipe FastV's code runs), every backend, GQA, several spans per row, rows without an image
and padding rows, with span_attention's log-sum-exp and without; compact_tokens against index_select; the
ranges of the survivors against key_ranges of the compacted layout; top_k_mask against torch.topk; bad input;
the op contract."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm
from fastmm.reference import prune as ref

ops = fastmm.ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Probabilities are at most 1; bf16 inputs round the logits by about 2^-8 relative.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _layout(B: int, L: int, seed: int):
    """Key ranges with bidirectional image spans in causal text, as a unified model's prefill builds them."""
    gen = torch.Generator().manual_seed(seed)
    modality = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        start = int(torch.randint(0, max(L // 2, 1), (1,), generator=gen))
        modality[b, start : start + L // 3] = 1
    return ops.key_ranges(modality=modality)


def _eager_importance(q, k, kv_start, kv_end, rows, span_start, span_end, scale=None):
    """FastV's recipe in fp64: every probability of every query ([B, Hq, L, S]), then the rated rows' mean over
    heads and rows, then the span columns. Written with a Python loop over rows and spans, not from the spec."""
    B, Hq, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    keys = k.double().repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhld,bhsd->bhls", q.double(), keys) * scale
    j = torch.arange(S)
    allowed = (j[None, None, :] >= kv_start[:, :, None].long()) & (j[None, None, :] < kv_end[:, :, None].long())
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    rows, span_start, span_end = (t if t.dim() == 2 else t[:, None] for t in (rows, span_start, span_end))
    out = []
    for b in range(B):
        rated = [r for r in rows[b].tolist() if r >= 0]
        mass = probs[b][:, rated].mean(dim=(0, 1)) if rated else torch.zeros(S, dtype=torch.float64)
        out.append(torch.cat([mass[s:e] for s, e in zip(span_start[b].tolist(), span_end[b].tolist())]))
    width = max(len(row) for row in out)
    return torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in out])


IMPORTANCE_CASES = [
    # B, Hq, Hkv, L, d, rows, spans (per row a list of (start, end))
    (1, 4, 4, 16, 8, [[15]], [[(2, 10)]]),  # FastV: the last token over one image
    (2, 4, 2, 20, 16, [[19, -1, -1], [17, 18, 19]], [[(1, 7), (9, 14)], [(3, 3), (0, 0)]]),  # GQA, 2 spans, no image
    (3, 6, 2, 11, 3, [[10], [5], [-1]], [[(0, 11)], [(4, 9)], [(2, 6)]]),  # a row that rates with no row
    (2, 2, 1, 33, 17, [list(range(20, 33)), list(range(25, 33)) + [-1] * 5], [[(4, 20)], [(10, 25)]]),  # text rows
]


def _importance_args(case, dtype, device, seed=0):
    B, Hq, Hkv, L, d, rows, spans = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, d, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype).to(device)
    kv_start, kv_end = (t.to(device) for t in _layout(B, L, seed))
    P = max(len(row) for row in spans)
    starts = torch.tensor([[s for s, _ in row] + [0] * (P - len(row)) for row in spans], device=device)
    ends = torch.tensor([[e for _, e in row] + [0] * (P - len(row)) for row in spans], device=device)
    return q, k, kv_start, kv_end, torch.tensor(rows, device=device), starts, ends


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("case", IMPORTANCE_CASES, ids=["fastv", "gqa-spans", "padding-row", "text-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_lse", [True, False], ids=["lse", "own-lse"])
def test_importance_equals_eager_probabilities(backend, device, case, dtype, with_lse):
    q, k, kv_start, kv_end, rows, starts, ends = _importance_args(case, dtype, device)
    v = torch.randn_like(k)
    with fastmm.use_backend(backend):
        lse = ops.span_attention(q, k, v, kv_start, kv_end, return_lse=True)[1] if with_lse else None
        got = ops.attention_importance(q, k, kv_start, kv_end, rows, starts, ends, lse=lse)
    expected = _eager_importance(q, k, kv_start.cpu(), kv_end.cpu(), rows.cpu(), starts.cpu(), ends.cpu())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,R,S,n,d", [(1, 4, 4, 1, 9, 5, 1), (3, 4, 2, 3, 40, 37, 17), (2, 8, 2, 5, 70, 66, 128)])
def test_importance_kernel_against_reference(backend, device, dtype, B, Hq, Hkv, R, S, n, d):
    """The kernel over awkward sizes: padding rows (empty ranges, lse -inf), padding columns (-1)."""
    gen = torch.Generator().manual_seed(B * 100 + d)
    q = torch.randn(B, Hq, R, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
    start = torch.randint(0, S // 2, (B, R), generator=gen, dtype=torch.int32)
    end = torch.minimum(start + torch.randint(0, S, (B, R), generator=gen, dtype=torch.int32), torch.tensor(S)).int()
    end[:, 0] = start[:, 0]  # an empty range: a padding row
    columns = torch.randint(-1, S, (B, n), generator=gen, dtype=torch.int32)
    lse = ref.attention_importance_fwd(q, k, start * 0, torch.full_like(end, S), torch.zeros(B, Hq, R), torch.arange(S).int().expand(B, S), 1.0)
    lse = torch.log(lse / R).float()[:, None, :1].expand(B, Hq, R).contiguous()  # plausible magnitudes
    lse[:, :, 0] = float("-inf")
    args = [t.to(device) for t in (q, k, start, end, lse, columns)]
    with fastmm.use_backend(backend):
        got = ops.prune.attention_importance_fwd(*args, 0.3)
    baseline = ref.attention_importance_fwd(*args, 0.3)
    truth = ref.attention_importance_fwd(q.double(), k.double(), start, end, lse, columns, 0.3)
    assert torch.isfinite(got).all()
    assert_error_ratio("attention_importance", got.cpu(), baseline.cpu(), truth)


def test_span_attention_returns_log_sum_exp():
    """lse is torch.logsumexp of the allowed logits, the sink included; -inf for a query that attends nothing."""
    q, k, kv_start, kv_end, *_ = _importance_args(IMPORTANCE_CASES[1], torch.float32, "cpu")
    kv_end = kv_end.clone()
    kv_end[0, 3] = kv_start[0, 3]  # query 3 of row 0 attends nothing
    sinks = torch.randn(q.shape[1])
    keys = k.repeat_interleave(2, dim=1)
    logits = torch.einsum("bhld,bhsd->bhls", q.double(), keys.double()) * q.shape[-1] ** -0.5
    j = torch.arange(k.shape[2])
    allowed = (j >= kv_start[..., None]) & (j < kv_end[..., None])
    expected = torch.logsumexp(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    _, lse = ops.span_attention(q, k, torch.randn_like(k), kv_start, kv_end, return_lse=True)
    torch.testing.assert_close(lse.double(), expected, rtol=0, atol=1e-5)
    assert lse[0, :, 3].isneginf().all()
    _, with_sink = ops.span_attention(q, k, torch.randn_like(k), kv_start, kv_end, sinks=sinks, return_lse=True)
    torch.testing.assert_close(with_sink.double(), torch.logaddexp(expected, sinks.double()[None, :, None]), rtol=0, atol=1e-5)


def test_span_keys():
    keys = ops.span_keys(torch.tensor([[3, 10], [0, 0], [5, 1]]), torch.tensor([[6, 12], [0, 0], [7, 2]]))
    assert keys.tolist() == [[3, 4, 5, 10, 11], [-1] * 5, [5, 6, 1, -1, -1]]


# ------------------------------------------------------------------------------------------------ compaction


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L,D,capacity", [(1, 1, 1, 1), (3, 17, 5, 17), (2, 40, 64, 25), (2, 6, 3, 0)])
def test_compact_tokens_equals_index_select(backend, device, dtype, B, L, D, capacity):
    gen = torch.Generator().manual_seed(L)
    hidden = torch.randn(B, L, D, generator=gen).to(dtype)
    positions = torch.randint(0, 1000, (B, L), generator=gen)
    keep = torch.rand(B, L, generator=gen) < 0.6
    for b in range(B):  # at most capacity per row, one row keeping exactly capacity where it can
        kept = keep[b].nonzero()[:, 0]
        keep[b, kept[capacity:]] = False
    if capacity and capacity <= L:
        keep[0] = False
        keep[0, torch.randperm(L, generator=gen)[:capacity]] = True
    with fastmm.use_backend(backend):
        out = ops.compact_tokens(hidden.to(device), positions.to(device), keep.to(device), capacity)
    for b in range(B):
        index = keep[b].nonzero()[:, 0]
        n = len(index)
        assert int(out.count[b]) == n and out.count.dtype == torch.int32 and out.count.device.type == device
        assert torch.equal(out.hidden[b, :n].cpu(), hidden[b].index_select(0, index))
        assert torch.equal(out.positions[b, :n].cpu(), positions[b].index_select(0, index))
        assert torch.equal(out.source[b, :n].cpu(), index)
        assert (out.hidden[b, n:] == 0).all() and (out.positions[b, n:] == 0).all() and (out.source[b, n:] == -1).all()
    assert out.hidden.shape == (B, capacity, D) and out.hidden.dtype == dtype


def test_compact_tokens_capacity_overflow():
    keep = torch.tensor([[True, True, False], [True, True, True]])
    with pytest.raises(ValueError, match="compact_tokens: a row keeps more tokens than capacity = 2.*up to 3"):
        ops.compact_tokens(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.int64), keep, 2)


def test_compact_key_ranges_equal_the_layout_of_the_survivors():
    """Ranges mapped through compaction equal key_ranges built on the compacted layout: causal text stays causal
    over the survivors and an image span stays one bidirectional span."""
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0]])
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1, 1, 1, 1]]).bool()
    kv_start, kv_end = ops.key_ranges(modality=modality)
    positions = torch.arange(9).expand(2, 9)
    packed = ops.compact_tokens(modality[..., None].float(), positions, keep, 9)
    start, end = ops.compact_key_ranges(kv_start, kv_end, keep, packed.source)
    for b in range(2):
        n = int(packed.count[b])
        expected = ops.key_ranges(modality=modality[b][keep[b]][None])
        assert start[b, :n].tolist() == expected[0][0].tolist() and end[b, :n].tolist() == expected[1][0].tolist()
        assert (start[b, n:] == 0).all() and (end[b, n:] == 0).all()


def test_top_k_mask_equals_topk():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 30, generator=gen)
    valid = torch.rand(4, 30, generator=gen) < 0.7
    counts = torch.tensor([0, 5, 12, 40])
    got = ops.top_k_mask(scores, counts, valid)
    for b in range(4):
        candidates = valid[b].nonzero()[:, 0]
        k = min(int(counts[b]), len(candidates))
        chosen = candidates[scores[b, candidates].topk(k).indices]
        expected = torch.zeros(30, dtype=torch.bool)
        expected[chosen] = True
        assert torch.equal(got[b], expected)
    tied = ops.top_k_mask(torch.zeros(1, 5), 2)
    assert tied.tolist() == [[True, True, False, False, False]]  # ties: the lower column first


# ----------------------------------------------------------------------------------------------- bad input


def _good_importance():
    return dict(zip(("q", "k", "kv_start", "kv_end", "rows", "span_start", "span_end"),
                    _importance_args(IMPORTANCE_CASES[1], torch.float32, "cpu")))  # fmt: skip


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(rows=torch.tensor([[19], [20]])), ValueError, "rows must be query indices in \\[0, L = 20\\)"),
        (dict(rows=torch.tensor([[-2], [3]])), ValueError, "rows must be query indices"),
        (dict(span_end=torch.tensor([[7, 21], [3, 0]])), ValueError, "spans must lie in \\[0, S = 20\\]"),
        (dict(span_start=torch.tensor([[8, 9], [3, 0]])), ValueError, "span_end >= span_start"),
        (dict(rows=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "rows must be \\[B\\] or \\[B, P\\] with B = 2"),
        (dict(rows=torch.zeros(2, 1)), TypeError, "rows"),
        (dict(lse=torch.zeros(2, 4, 20, dtype=torch.float64)), TypeError, "lse must be float32"),
        (dict(lse=torch.zeros(2, 4, 19)), ValueError, "lse must have shape"),
        (dict(kv_end=None), ValueError, "give both kv_start and kv_end"),
        (dict(k=torch.zeros(2, 3, 20, 16)), ValueError, "multiple of k's heads Hkv = 3"),
        (dict(scaling=float("nan")), ValueError, "scaling must be None or a finite float"),
    ],
)
def test_importance_bad_input(change, exc, words):
    args = {**_good_importance(), **change}
    with pytest.raises(exc, match=words):
        ops.attention_importance(**args)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(keep=torch.ones(2, 5, dtype=torch.int64)), TypeError, "keep must be a bool tensor"),
        (dict(keep=torch.ones(2, 4, dtype=torch.bool)), ValueError, "keep must have shape"),
        (dict(positions=torch.zeros(2, 5)), TypeError, "positions"),
        (dict(hidden=torch.zeros(2, 5)), ValueError, "hidden must be"),
        (dict(capacity=-1), ValueError, "capacity must be an int >= 0, got -1"),
        (dict(capacity=2.0), ValueError, "capacity must be an int"),
    ],
)
def test_compact_tokens_bad_input(change, exc, words):
    args = dict(hidden=torch.zeros(2, 5, 3), positions=torch.zeros(2, 5, dtype=torch.int64),
                keep=torch.ones(2, 5, dtype=torch.bool), capacity=5)  # fmt: skip
    with pytest.raises(exc, match=words):
        ops.compact_tokens(**{**args, **change})


def test_top_k_mask_bad_input():
    with pytest.raises(ValueError, match="top_k_mask: k must be >= 0"):
        ops.top_k_mask(torch.zeros(2, 3), -1)
    with pytest.raises(ValueError, match="scores must not be NaN"):
        ops.top_k_mask(torch.tensor([[0.0, float("nan")]]), 1)


# --------------------------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck_and_compile(backend, device):
    q, k, kv_start, kv_end, rows, starts, ends = _importance_args(IMPORTANCE_CASES[1], torch.float32, device)
    q_rows = q[:, :, -3:].contiguous()
    row_start, row_end = kv_start[:, -3:].contiguous(), kv_end[:, -3:].contiguous()
    lse = torch.zeros(q_rows.shape[:3], device=device)
    columns = ops.span_keys(starts, ends).int()
    hidden, positions = torch.randn(2, 20, 8, device=device), torch.arange(20, device=device).expand(2, 20).contiguous()
    keep = torch.rand(2, 20, device=device) < 0.5
    with fastmm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastmm.attention_importance.default, (q_rows, k, row_start, row_end, lse, columns, 0.25))
        torch.library.opcheck(torch.ops.fastmm.compact_tokens.default, (hidden, positions, keep, 20))
        torch._dynamo.reset()

        def prune(hidden, positions, keep, q_rows, k):
            packed = ops.compact_tokens(hidden, positions, keep, 12)
            return packed.hidden, packed.count, ops.prune.attention_importance_fwd(q_rows, k, row_start, row_end, lse, columns, 0.25)

        keep[:, 12:] = False
        compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")(hidden, positions, keep, q_rows, k)
        eager = prune(hidden, positions, keep, q_rows, k)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected)
