"""Op family `vq`: every backend against a brute-force argmin over exact (fp64) distances.

Backends sum the dot products in different orders, so two codes whose fp32 scores differ by a rounding error
may swap. The checks are therefore: the chosen code attains the minimum distance within the fp32 error of
a score, and on data whose scores are exact in fp32 (small integers) the indices are exactly the brute
force's, ties to the lowest index included."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmm
from fastmm.reference import vq as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, D): D from Emu3 (4) and Janus (8) to Chameleon (256); K not a multiple of any tile; N = 1 and primes.
SHAPES = [(1, 1, 4), (7, 5, 8), (65, 1000, 8), (33, 257, 32), (17, 130, 256)]


def _scores64(rows: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact scores to minimize, [N, K] in fp64: |z - e|^2, or minus the cosine between z and the codes the
    op compares against (normalized in fp32, rounded to the codebook's dtype: fastmm.reference.vq)."""
    z = rows.double().cpu()
    if metric == "l2":
        return torch.cdist(z, codebook.double().cpu()).pow(2)
    codes = ref.code_scores_inputs(codebook.cpu(), metric)[0].double()
    return -(torch.nn.functional.normalize(z, dim=1) @ codes.t())


def _slack(rows: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row bound on the fp32 error of a kernel's score, in the units of _scores64."""
    z, e = rows.double().cpu(), codes.double().cpu()
    if metric == "cosine":
        return torch.full((z.shape[0],), 1e-5, dtype=torch.float64)
    dot_scale = 2 * z.norm(dim=1) * e.norm(dim=1).max() + e.pow(2).sum(1).max()
    return 4e-6 * (z.shape[1] ** 0.5) * dot_scale


def assert_nearest(label, indices, rows, codebook, metric):
    """Each index attains its row's minimum score within the fp32 slack."""
    scores = _scores64(rows, codebook, metric)
    got = scores.gather(1, indices.reshape(-1, 1).cpu()).squeeze(1)
    best = scores.min(dim=1).values
    excess = got - best
    worst = int(excess.argmax()) if excess.numel() else 0
    assert (excess <= _slack(rows, codebook, metric)).all(), (
        f"{label}: row {worst} picked code {int(indices.reshape(-1)[worst])} with score {got[worst]:.9g}, "
        f"minimum {best[worst]:.9g} at code {int(scores[worst].argmin())}"
    )


def _data(N, K, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=gen).to(dtype).to(device)
    codebook = torch.randn(K, D, generator=gen).to(dtype).to(device)
    return z, codebook


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("metric", ref.METRICS)
@pytest.mark.parametrize("N,K,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vq_quantize_rows(backend, device, metric, N, K, D, dtype):
    z, codebook = _data(N, K, D, dtype, device)
    with fastmm.use_backend(backend):
        indices, quantized = fastmm.ops.vq_quantize(z, codebook, metric)
    assert indices.shape == (N,) and indices.dtype == torch.int64
    assert_nearest(f"{backend} {metric}", indices, z, codebook, metric)
    codes, _ = ref.code_scores_inputs(codebook, metric)
    assert quantized.dtype == dtype and torch.equal(quantized, codes[indices])


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vq_quantize_channels_first_in_place(backend, device, dtype):
    """[B, D, H, W] maps, contiguous and sliced (non-contiguous), give indices [B, H, W] and quantized in
    z's layout, equal to quantizing the same vectors as rows."""
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(300, 8, generator=gen).to(dtype).to(device)
    full = torch.randn(2, 8, 6, 10, generator=gen).to(dtype).to(device)
    for label, z in {"contiguous": full, "sliced": full[:, :, 1:4, ::3]}.items():
        rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
        with fastmm.use_backend(backend):
            indices, quantized = fastmm.ops.vq_quantize(z, codebook)
            row_indices, _ = fastmm.ops.vq_quantize(rows, codebook)
        assert indices.shape == (z.shape[0], *z.shape[2:]), label
        assert quantized.shape == z.shape and quantized.dtype == dtype, label
        assert_nearest(label, indices, rows, codebook, "l2")
        torch.testing.assert_close(indices.reshape(-1), row_indices, msg=label)
        torch.testing.assert_close(quantized, codebook[indices].permute(0, 3, 1, 2), msg=label)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vq_exact_scores_and_ties_to_lowest_index(backend, device, dtype):
    """Small integers make every score exact in fp32: indices must equal torch.argmin's, and duplicated
    codes (near each other and far apart in the codebook, so in one tile and across tiles) resolve to the
    lowest index."""
    gen = torch.Generator().manual_seed(2)
    codebook = torch.randint(-4, 5, (700, 8), generator=gen).float()
    codebook[650] = codebook[3]
    codebook[4] = codebook[3]
    z = torch.cat([torch.randint(-4, 5, (40, 8), generator=gen).float(), codebook[[3, 650, 4]]])
    expected = torch.cdist(z.double(), codebook.double()).argmin(dim=1)
    z, codebook = z.to(dtype).to(device), codebook.to(dtype).to(device)
    with fastmm.use_backend(backend):
        indices, quantized = fastmm.ops.vq_quantize(z, codebook)
    torch.testing.assert_close(indices.cpu(), expected)
    assert indices[-3:].tolist() == [3, 3, 3]
    spec_indices, spec_quantized = ref.vq_quantize(z, codebook)  # exact scores: the spec agrees bit for bit
    torch.testing.assert_close(indices, spec_indices, rtol=0, atol=0)
    torch.testing.assert_close(quantized, spec_quantized, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_vq_nan_rows_get_code_zero(backend, device):
    """Documented: a row of z holding NaN scores NaN against every code and gets index 0 (torch.argmin
    on an all-NaN row gives 0 too); the other rows are unaffected."""
    z, codebook = _data(9, 50, 8, torch.float32, device, seed=3)
    z[2, 5] = float("nan")
    z[7] = float("nan")
    with fastmm.use_backend(backend):
        indices, _ = fastmm.ops.vq_quantize(z, codebook)
    assert indices[2] == 0 and indices[7] == 0
    keep = [0, 1, 3, 4, 5, 6, 8]
    assert_nearest("finite rows", indices[keep], z[keep], codebook, "l2")


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize(
    "name,batch,K,D,metric",
    [("chameleon", (2, 4, 4), 1024, 256, "l2"), ("janus", (3, 6, 6), 2048, 8, "cosine"),
     ("emu3", (1, 8, 9), 4096, 4, "l2")],
)
def test_vq_scaled_down_model_shapes(backend, device, name, batch, K, D, metric):
    """The tokenizers' layouts at small sizes: channels-first feature maps against a model-like codebook."""
    B, H, W = batch
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(B, D, H, W, generator=gen).to(device)
    codebook = torch.randn(K, D, generator=gen).to(device)
    with fastmm.use_backend(backend):
        indices, _ = fastmm.ops.vq_quantize(z, codebook, metric)
    assert_nearest(name, indices, z.permute(0, 2, 3, 1).reshape(-1, D), codebook, metric)


@pytest.mark.parametrize("backend,device", backend_cases())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    N=st.integers(1, 40), K=st.integers(1, 300), D=st.sampled_from([1, 3, 4, 8, 16, 33]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16), metric=st.sampled_from(ref.METRICS),
)  # fmt: skip
def test_vq_property_chosen_code_attains_the_minimum(backend, device, N, K, D, scale, seed, metric):
    z, codebook = _data(N, K, D, torch.float32, device, seed)
    z, codebook = z * scale, codebook * scale
    with fastmm.use_backend(backend):
        indices, _ = fastmm.ops.vq_quantize(z, codebook, metric, return_quantized=False)
    assert_nearest(f"N={N} K={K} D={D} scale={scale}", indices, z, codebook, metric)


def test_vq_straight_through_gradient():
    z, codebook = _data(6, 20, 4, torch.float32, "cpu", seed=5)
    z.requires_grad_()
    _, quantized = fastmm.ops.vq_quantize(z, codebook)
    grad = torch.randn_like(quantized)
    quantized.backward(grad)
    torch.testing.assert_close(z.grad, grad)


def test_vq_embed_gathers_and_differentiates():
    table = torch.randn(50, 12, requires_grad=True)
    indices = torch.tensor([[3, 49], [0, 3]])
    out = fastmm.ops.vq_embed(indices, table)
    torch.testing.assert_close(out, table.detach()[indices])
    torch.testing.assert_close(out, ref.vq_embed(indices, table))
    out.sum().backward()
    assert table.grad[3].eq(2).all() and table.grad[1].eq(0).all()
    assert fastmm.ops.vq_embed(torch.empty(0, dtype=torch.long), table).shape == (0, 12)


def test_vq_empty_inputs():
    codebook = torch.randn(10, 4)
    indices, quantized = fastmm.ops.vq_quantize(torch.empty(0, 4), codebook)
    assert indices.shape == (0,) and quantized.shape == (0, 4)
    indices, quantized = fastmm.ops.vq_quantize(torch.empty(2, 4, 0, 3), codebook)
    assert indices.shape == (2, 0, 3) and quantized.shape == (2, 4, 0, 3)


BAD_INPUTS = [
    # (label, call, exception, words the message must contain)
    ("D mismatch", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(9, 3)), ValueError,
     ["codebook", "D = z.shape[1] = 4"]),
    ("integer z", lambda: fastmm.ops.vq_quantize(torch.ones(5, 4, dtype=torch.long), torch.randn(9, 4)),
     TypeError, ["z", "int64"]),
    ("codebook 1-D", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(4)), ValueError,
     ["codebook", "2-D"]),
    ("empty codebook", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(0, 4)), ValueError,
     ["codebook", "at least one code"]),
    ("z 3-D", lambda: fastmm.ops.vq_quantize(torch.randn(2, 5, 4), torch.randn(9, 4)), ValueError,
     ["z", "[B, D, H, W]"]),
    ("unknown metric", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(9, 4), "dot"), ValueError,
     ["metric", "'dot'"]),
    ("codebook_sq with cosine", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(9, 4), "cosine",
                                                               torch.ones(9)), ValueError, ["codebook_sq", "l2"]),
    ("codebook_sq wrong size", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.randn(9, 4), "l2",
                                                              torch.ones(8)), ValueError, ["codebook_sq", "(9,)"]),
    ("NaN codebook", lambda: fastmm.ops.vq_quantize(torch.randn(5, 4), torch.full((9, 4), float("nan"))),
     ValueError, ["codebook", "finite"]),
    ("embed id too large", lambda: fastmm.ops.vq_embed(torch.tensor([0, 9]), torch.randn(9, 4)), ValueError,
     ["indices", "[0, 9)", "[0, 9]"]),
    ("embed negative id", lambda: fastmm.ops.vq_embed(torch.tensor([-1]), torch.randn(9, 4)), ValueError,
     ["indices", "[-1, -1]"]),
    ("embed float ids", lambda: fastmm.ops.vq_embed(torch.tensor([0.0]), torch.randn(9, 4)), TypeError,
     ["indices", "integer"]),
    ("embed table 1-D", lambda: fastmm.ops.vq_embed(torch.tensor([0]), torch.randn(9)), ValueError,
     ["table", "2-D"]),
]


@pytest.mark.parametrize("label,call,exc,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_vq_bad_input_names_the_argument(label, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_vq_opcheck_and_compile(backend, device):
    z, codebook = _data(12, 40, 8, torch.float32, device, seed=6)
    sq = codebook.pow(2).sum(1)
    with fastmm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastmm.vq_nearest_code.default, (z[None], codebook, sq))
        channels_first = z.t().reshape(1, 8, 3, 4)
        torch.library.opcheck(torch.ops.fastmm.vq_nearest_code.default, (ref.as_rows(channels_first), codebook, sq))
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, e: fastmm.ops.vq_quantize(a, e), fullgraph=True, backend="aot_eager")
        indices, quantized = compiled(channels_first, codebook)
        eager_indices, eager_quantized = fastmm.ops.vq_quantize(channels_first, codebook)
    torch.testing.assert_close(indices, eager_indices)
    torch.testing.assert_close(quantized, eager_quantized)
