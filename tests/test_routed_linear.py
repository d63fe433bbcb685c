"""Op family `routed_linear`: every backend against the reference, forward and backward, over dtypes and awkward
shapes; and the op contract (bad input, torch.library.opcheck, torch.compile(fullgraph=True))."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm
from fastmm.reference import routed_linear as ref

ops = fastmm.ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, K, N, layout) with layouts: all one modality, two interleaved (65-token image spans), an empty one.
ROUTED_CASES = [(1, 1, 1, "one"), (29, 17, 5, "interleaved"), (70, 64, 130, "spans"), (41, 33, 16, "empty-middle")]


def _f64(t):
    return None if t is None else t.detach().double()


def _routed_modality(rows, layout, device):
    if layout == "one":
        return torch.ones(rows, dtype=torch.long, device=device)
    if layout == "interleaved":
        return (torch.arange(rows, device=device) % 2)
    if layout == "spans":
        return ((torch.arange(rows, device=device) // 13) % 2)
    return (torch.arange(rows, device=device) % 2) * 2  # ids 0 and 2 with M = 3: modality 1 has no rows


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("rows,in_features,out_features,layout", ROUTED_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_routed_linear(backend, device, rows, in_features, out_features, layout, dtype, with_bias):
    gen = torch.Generator().manual_seed(4)
    num_modalities = 3
    x = torch.randn(rows, in_features, generator=gen).to(dtype).to(device)
    weight = (torch.randn(num_modalities, out_features, in_features, generator=gen) / in_features**0.5).to(dtype)
    weight = weight.to(device)
    bias = torch.randn(num_modalities, out_features, generator=gen).to(dtype).to(device) if with_bias else None
    modality = _routed_modality(rows, layout, device)
    grad_y = torch.randn(rows, out_features, generator=gen).to(dtype).to(device)

    def run(fn, cast):
        leaves = [cast(x).requires_grad_(), cast(weight).requires_grad_()]
        leaves += [cast(bias).requires_grad_()] if with_bias else []
        y = fn(leaves[0], modality, leaves[1], leaves[2] if with_bias else None)
        return (y, *torch.autograd.grad((y * cast(grad_y)).sum(), leaves))

    with fastmm.use_backend(backend):
        got = run(fastmm.ops.routed_linear, lambda t: t.detach().clone())
    baseline = run(ref.routed_linear, lambda t: t.detach().clone())
    truth = run(ref.routed_linear, _f64)
    for name, g, b, t in zip(["y", "dx", "dweight", "dbias"], got, baseline, truth):
        assert g.dtype == dtype
        assert_error_ratio(f"routed_linear {name}", g, b, t)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_routed_linear_empty(backend, device):
    """No rows at all: an empty [0, N] output."""
    empty = torch.empty(0, 33, device=device)
    weight = torch.randn(3, 5, 33, device=device)
    with fastmm.use_backend(backend):
        z = fastmm.ops.routed_linear(empty, torch.empty(0, dtype=torch.int32, device=device), weight)
    assert z.shape == (0, 5)


BAD_ROUTED_INPUTS = [
    ("weight 2-D", dict(weight=torch.randn(4, 8)), ValueError, ["weight", "3-D", "[M, N, K]"]),
    ("K mismatch", dict(weight=torch.randn(2, 4, 9)), ValueError, ["weight", "K = x.shape[-1] = 8"]),
    ("bias shape", dict(bias=torch.randn(2, 5)), ValueError, ["bias", "(2, 4)"]),
    ("float ids", dict(modality=torch.zeros(6)), TypeError, ["modality", "integer"]),
    ("id out of range", dict(modality=torch.full((6,), 2)), ValueError, ["modality", "[0, 2)"]),
    ("modality shape", dict(modality=torch.zeros(2, 3, dtype=torch.long)), ValueError, ["modality", "(6,)"]),
]


@pytest.mark.parametrize("label,change,exc,words", BAD_ROUTED_INPUTS, ids=[c[0] for c in BAD_ROUTED_INPUTS])
def test_routed_linear_bad_input(label, change, exc, words):
    args = {"x": torch.randn(6, 8), "modality": torch.tensor([0, 1] * 3), "weight": torch.randn(2, 4, 8)}
    args.update(change)
    with pytest.raises(exc) as info:
        ops.routed_linear(**args)
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 24, generator=gen).to(device).requires_grad_()
    modality = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 0, 1], device=device)
    weight = torch.randn(3, 7, 24, generator=gen).to(device).requires_grad_()
    bias = torch.randn(3, 7, generator=gen).to(device).requires_grad_()
    with fastmm.use_backend(backend):
        for args in [(x, modality, weight, bias), (x, modality, weight, None)]:
            torch.library.opcheck(torch.ops.fastmm.routed_linear.default, args)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_compile_fullgraph(backend, device):
    """The op is a graph leaf under torch.compile(fullgraph=True): no graph break, same values, and gradients
    flow through the registered backward."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=gen).to(device).requires_grad_()
    modality = torch.randint(0, 2, (2, 9), generator=gen).to(device)
    weight = torch.randn(2, 12, 16, generator=gen).to(device).requires_grad_()
    bias = torch.randn(2, 12, generator=gen).to(device).requires_grad_()
    with fastmm.use_backend(backend):
        compiled = torch.compile(ops.routed_linear, fullgraph=True, backend="aot_eager")
        out = compiled(x, modality, weight, bias)
        out.sum().backward()
    grads = (x.grad.clone(), weight.grad.clone(), bias.grad.clone())
    x.grad = weight.grad = bias.grad = None

    expected = ref.routed_linear(x, modality, weight, bias)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, (x.grad, weight.grad, bias.grad), rtol=1e-4, atol=1e-4)
