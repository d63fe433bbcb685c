"""Op family `norm`: every backend against the reference, forward and backward, over dtypes and awkward shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases
from tolerance import assert_error_ratio

import fastmm
from fastmm.reference import norm as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, hidden size, number of modalities): 1, primes, non-powers of two, a batch dimension.
NORM_CASES = [((1,), 1, 1), ((7,), 3, 2), ((113,), 64, 3), ((2, 17), 1000, 2)]
NORMS = {
    "rms": (fastmm.ops.modality_rms_norm, ref.modality_rms_norm),
    "layer": (fastmm.ops.modality_layer_norm, ref.modality_layer_norm),
}


def _modality(lead, num_modalities, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_modalities, lead, generator=gen).to(device)


def _norm_inputs(kind, lead, hidden, num_modalities, dtype, device, with_residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, hidden, generator=gen) * 2 + 0.5).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(num_modalities, hidden, generator=gen)).to(dtype).to(device)
    args = {"weight": weight}
    if kind == "layer":
        args["bias"] = torch.randn(num_modalities, hidden, generator=gen).to(dtype).to(device)
    residual = torch.randn(*lead, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    return x, _modality(lead, num_modalities, device, seed), args, residual


def _f64(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("lead,hidden,num_modalities", NORM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_forward(backend, device, kind, with_residual, lead, hidden, num_modalities, dtype):
    op, spec = NORMS[kind]
    x, modality, params, residual = _norm_inputs(kind, lead, hidden, num_modalities, dtype, device, with_residual)
    with fastmm.use_backend(backend):
        out = op(x, modality, **params, residual=residual)
    baseline = spec(x, modality, **params, residual=residual)
    if with_residual:
        (out, s), (baseline, s_ref) = out, baseline
        assert s.dtype == dtype and torch.equal(s, s_ref), "residual stream must be x + residual rounded once"
    else:
        s_ref = x
    truth = spec(_f64(s_ref), modality, **{k: _f64(p) for k, p in params.items()})
    assert out.dtype == dtype
    assert_error_ratio(f"{kind} norm output", out, baseline, truth)


def _norm_grads(op, x, modality, params, residual, grad_y, grad_s):
    leaves = [x, *params.values()] + ([residual] if residual is not None else [])
    out = op(x, modality, **params, residual=residual)
    loss = (out[0] * grad_y).sum() + (out[1] * grad_s).sum() if residual is not None else (out * grad_y).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("lead,hidden,num_modalities", NORM_CASES[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_backward(backend, device, kind, with_residual, lead, hidden, num_modalities, dtype):
    op, spec = NORMS[kind]
    x, modality, params, residual = _norm_inputs(kind, lead, hidden, num_modalities, dtype, device, with_residual, 1)
    gen = torch.Generator().manual_seed(2)
    grad_y = torch.randn(x.shape, generator=gen).to(dtype).to(device)
    grad_s = torch.randn(x.shape, generator=gen).to(dtype).to(device)

    def leaves(cast):
        p = {k: cast(t).requires_grad_() for k, t in params.items()}
        r = cast(residual).requires_grad_() if residual is not None else None
        return cast(x).requires_grad_(), p, r

    xl, pl, rl = leaves(lambda t: t.detach().clone())
    with fastmm.use_backend(backend):
        grads = _norm_grads(op, xl, modality, pl, rl, grad_y, grad_s)
    xb, pb, rb = leaves(lambda t: t.detach().clone())
    baseline = _norm_grads(spec, xb, modality, pb, rb, grad_y, grad_s)
    xt, pt, rt = leaves(_f64)
    truth = _norm_grads(spec, xt, modality, pt, rt, grad_y.double(), grad_s.double())
    names = ["dx", *(f"d{k}" for k in params), "dresidual"]
    for name, g, b, t in zip(names, grads, baseline, truth):
        assert g.dtype == dtype
        assert_error_ratio(f"{kind} norm {name}", g, b, t)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_norm_edge_layouts(backend, device):
    """Non-contiguous x, a modality with no rows, a single modality for all rows, and empty x."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 40, generator=gen).to(device)
    x = base.t()[:, :33]  # (40, 33), non-contiguous
    weight = torch.randn(3, 33, generator=gen).to(device)
    layouts = {
        "modality 1 empty": torch.tensor([0, 2] * 20, device=device),
        "one modality": torch.full((40,), 1, device=device),
    }
    for label, modality in layouts.items():
        with fastmm.use_backend(backend):
            out = fastmm.ops.modality_rms_norm(x, modality, weight)
        expected = ref.modality_rms_norm(x, modality, weight)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")
    empty = torch.empty(0, 33, device=device)
    with fastmm.use_backend(backend):
        y, s = fastmm.ops.modality_layer_norm(empty, torch.empty(0, dtype=torch.long, device=device), weight,
                                              residual=empty)
    assert y.shape == s.shape == (0, 33)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_rows_wider_than_triton_block(backend, device, kind, monkeypatch, caplog):
    """D = 8200 exceeds the rows triton holds in registers (8192): it falls back to the reference, once
    warned; the other backends take any width."""
    op, spec = NORMS[kind]
    monkeypatch.setattr(fastmm.backend, "_warned", set())
    x, modality, params, residual = _norm_inputs(kind, (3,), 8200, 2, torch.float32, device, True, 4)
    x.requires_grad_()
    with fastmm.use_backend(backend), caplog.at_level("WARNING", logger="fastmm"):
        y, s = op(x, modality, **params, residual=residual)
        (dx,) = torch.autograd.grad((y * y).sum() + s.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref, s_ref = spec(x_ref, modality, **params, residual=residual)
    (dx_ref,) = torch.autograd.grad((y_ref * y_ref).sum() + s_ref.sum(), x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    fell_back = [r for r in caplog.records if "exceeds the register-resident row limit" in r.getMessage()]
    assert len(fell_back) == (1 if backend == "triton" else 0), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else ["cpu"])
def test_triton_kernels_clamp_modality_ids_they_cannot_check(device):
    """Inside a CUDA-graph capture fastmm.ops cannot read ids: the triton kernels clamp an out-of-range id to
    [0, M) (it reads the nearest modality's weights) instead of reading out of bounds."""
    from fastmm.triton import norm as triton_norm

    if device == "cpu" and not fastmm.backend.triton_interpret():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    x, weight = torch.randn(3, 40, device=device), torch.randn(2, 40, device=device)
    y = triton_norm.rms_norm_fwd(x, torch.tensor([-4, 0, 9], device=device), weight, None, 1e-6)[0]
    expected = ref.rms_norm_fwd(x, torch.tensor([0, 0, 1], device=device), weight, None, 1e-6)[0]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
