"""Op family `linear`: every backend against fp64 truth by the error-ratio rule (tests/tolerance.py).

Row counts 17 and 40 pass the skinny kernels' limit (16; 4 for native bf16) and check the F.linear path; the
native kernel is also tested directly at every row count up to 16 (the decode layer calls it with any batch)
and in bf16, 4 is its tile of four rows of x; in-feature counts
1, 5 and 100 leave partial 16-lane blocks and K tiles; out-feature counts 1, 3 and 33 leave partial tiles of
weight rows and output columns."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm
from fastmm.backend import native_status
from fastmm.reference import linear as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 2, 3, 4, 7, 16, 17, 40]
IN_FEATURES = [1, 5, 64, 100, 512]
OUT_FEATURES = [1, 3, 33, 1000]


def _data(shape, N, dtype, device, bias=True, seed=0):
    """x of ``shape`` ([..., K]), weight [N, K] and bias [N] (or None), nn.Linear-like magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype).to(device)
    weight = (torch.randn(N, K, generator=gen) / max(1, K) ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=gen).to(dtype).to(device) if bias else None
    return x, weight, b


def assert_linear(label, out, x, weight, bias):
    """out against fp64 truth, within twice the error of F.linear at the input precision plus a floor."""
    truth = ref.linear_fwd(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == x.dtype, f"{label}: dtype {out.dtype}, expected {x.dtype}"
    assert_error_ratio(label, out, F.linear(x, weight, bias), truth)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_shape_grid(backend, device, M, dtype):
    cases = []
    for (i, K), (j, N) in itertools.product(enumerate(IN_FEATURES), enumerate(OUT_FEATURES)):
        bias = (i + j) % 2 == 0  # every K and every N both with and without a bias, at half the cost
        x, weight, b = _data((M, K), N, dtype, device, bias, seed=K * N + M)
        with fastmm.use_backend(backend):
            cases.append((f"{backend} M={M} K={K} N={N} bias={bias}", fastmm.ops.linear(x, weight, b), x, weight, b))
    for label, out, x, weight, b in cases:
        assert_linear(label, out, x, weight, b)


def _layouts(dtype, device):
    """(label, x, weight, bias): batched x, x read through strides or copied, weight read through its row
    stride or (transposed) by F.linear."""
    x, weight, b = _data((3, 5, 100), 33, dtype, device, seed=1)
    wide_x, wide_weight, _ = _data((2, 7, 130), 40, dtype, device, seed=2)
    return [
        ("3-D x", x, weight, b),
        ("x row stride 130", wide_x[:, :, :100], weight, b),
        ("x row stride 910", wide_x[:, 1, :100], weight, b),
        ("x every other row (copied)", wide_x[:, ::2, :100], weight, b),
        ("x column stride 5", x[0].t().contiguous().t(), weight, b),
        ("weight row stride 130", x, wide_weight[:33, :100], b),
        ("weight transposed view", x, weight.t().contiguous().t(), b),
        ("bias strided", x, weight, wide_weight[:33, 0]),
    ]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_batched_and_strided_inputs(backend, device, dtype):
    with fastmm.use_backend(backend):
        cases = [(label, fastmm.ops.linear(x, w, b), x, w, b) for label, x, w, b in _layouts(dtype, device)]
    for label, out, x, weight, b in cases:
        assert out.shape == (*x.shape[:-1], weight.shape[0]), label
        assert_linear(f"{backend} {label}", out, x, weight, b)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_linear_empty_inputs(backend, device):
    """Empty leading dims give an empty output; K = 0 gives the bias (or zeros) in every row."""
    x, weight, b = _data((2, 0, 8), 5, torch.float32, device)
    with fastmm.use_backend(backend):
        empty_rows = fastmm.ops.linear(x, weight, b)
        no_features = fastmm.ops.linear(torch.empty(3, 0, device=device), torch.empty(5, 0, device=device), b)
        no_features_no_bias = fastmm.ops.linear(torch.empty(3, 0, device=device), torch.empty(5, 0, device=device))
        no_outputs = fastmm.ops.linear(torch.randn(3, 8, device=device), torch.empty(0, 8, device=device))
    assert empty_rows.shape == (2, 0, 5)
    # An empty strided view (found by tests/test_fuzz.py): its strides are not a dense row's.
    with fastmm.use_backend(backend):
        empty_strided = fastmm.ops.linear(torch.randn(4, 5, device=device)[:0, ::2], torch.randn(3, 3, device=device))
    assert empty_strided.shape == (0, 3)
    torch.testing.assert_close(no_features, b.expand(3, 5))
    torch.testing.assert_close(no_features_no_bias, torch.zeros(3, 5, device=device))
    assert no_outputs.shape == (3, 0)


def test_linear_falls_back_to_f_linear_when_autograd_records():
    """Documented: with grad enabled and an input requiring grad, F.linear runs, so training still works."""
    x, weight, b = _data((2, 3, 16), 8, torch.float32, "cpu")
    weight.requires_grad_()
    out = fastmm.ops.linear(x, weight, b)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.reshape(-1, 16).sum(0).expand(8, 16))
    with torch.no_grad():
        assert not fastmm.ops.linear(x, weight, b).requires_grad


BAD_INPUTS = [
    # (label, call, exception, words the message must contain)
    ("integer x", lambda: fastmm.ops.linear(torch.ones(2, 4, dtype=torch.long), torch.randn(3, 4)), TypeError,
     ["x", "int64"]),
    ("0-d x", lambda: fastmm.ops.linear(torch.tensor(1.0), torch.randn(3, 1)), ValueError, ["x", "0-d"]),
    ("weight not a tensor", lambda: fastmm.ops.linear(torch.randn(2, 4), [[1.0] * 4]), TypeError,
     ["weight", "list"]),
    ("weight 1-D", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(4)), ValueError, ["weight", "2-D"]),
    ("K mismatch", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(3, 5)), ValueError,
     ["weight", "K = x.shape[-1] = 4"]),
    ("weight dtype", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(3, 4).half()), TypeError,
     ["weight", "torch.float32", "torch.float16"]),
    ("bias dtype", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3).double()),
     TypeError, ["bias", "torch.float64"]),
    ("bias shape", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), ValueError,
     ["bias", "(3,)", "(4,)"]),
    ("weight device", lambda: fastmm.ops.linear(torch.randn(2, 4), torch.randn(3, 4, device="meta")), ValueError,
     ["weight", "meta", "cpu"]),
]


@pytest.mark.parametrize("label,call,exc,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_linear_bad_input_names_the_argument(label, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


@pytest.mark.skipif(not native_status()[0], reason=native_status()[1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_skinny_kernel_at_every_row_count(dtype):
    """Row counts up to 16 in every dtype, past the bf16 routing limit too: tiles of 4, 2 and 1 rows of x."""
    from fastmm.native import linear as native

    for M, (K, N) in itertools.product(range(1, 17), [(100, 33), (512, 8)]):
        x, weight, b = _data((M, K), N, dtype, "cpu", seed=M)
        assert_linear(f"native skinny M={M} K={K} N={N}", native.skinny_linear(x, weight, b), x, weight, b)


@pytest.mark.skipif(not native_status()[0], reason=native_status()[1])
def test_native_launcher_guards_its_buffers():
    """Called past fastmm.ops, the native launcher still refuses buffers the kernel would misread."""
    from fastmm.native import linear as native

    with pytest.raises(ValueError, match="weight"):
        native.linear_fwd(torch.randn(2, 4), torch.randn(3, 4).half(), None)
    with pytest.raises(ValueError, match="bias"):
        native.linear_fwd(torch.randn(2, 4), torch.randn(3, 4), torch.randn(5))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_linear_opcheck_and_compile(backend, device):
    x, weight, b = _data((2, 3, 40), 24, torch.float32, device, seed=3)
    with fastmm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastmm.linear.default, (x[0], weight, b))
        torch.library.opcheck(torch.ops.fastmm.linear.default, (x[0], weight, None))
        torch._dynamo.reset()

        def decode_step(h, w, bias):
            return torch.relu(fastmm.ops.linear(h, w, bias)) + 1

        compiled = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
        out = compiled(x, weight, b)
        eager = decode_step(x, weight, b)
    torch.testing.assert_close(out, eager)
