"""Op family `norm`: the op contract (bad input, torch.library.opcheck, torch.compile(fullgraph=True))."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases

import fastmm
from fastmm.reference import norm as ref

ops = fastmm.ops


def _good(rows=6, hidden=8, num_modalities=2):
    return torch.randn(rows, hidden), torch.tensor([0, 1] * (rows // 2)), torch.randn(num_modalities, hidden)


BAD_NORM_INPUTS = [
    # (label, change to the good arguments, exception, words the message must contain)
    ("weight 1-D", lambda a: a.update(weight=torch.randn(8)), ValueError, ["weight", "2-D", "[M, D]"]),
    ("weight wrong D", lambda a: a.update(weight=torch.randn(2, 9)), ValueError, ["weight", "D = x.shape[-1] = 8"]),
    ("float ids", lambda a: a.update(modality=torch.zeros(6)), TypeError, ["modality", "integer", "float32"]),
    ("id too large", lambda a: a.update(modality=torch.tensor([0, 1, 2, 0, 1, 0])), ValueError,
     ["modality", "[0, 2)", "[0, 2]"]),
    ("negative id", lambda a: a.update(modality=torch.tensor([0, -1, 0, 0, 1, 0])), ValueError, ["modality", "[-1, 1]"]),
    ("modality shape", lambda a: a.update(modality=torch.zeros(5, dtype=torch.long)), ValueError,
     ["modality", "(6,)", "(5,)"]),
    ("integer x", lambda a: a.update(x=torch.ones(6, 8, dtype=torch.long)), TypeError, ["x", "int64"]),
    ("mixed devices", lambda a: a.update(weight=torch.randn(2, 8, device="meta")), ValueError, ["weight", "meta", "cpu"]),
    ("residual shape", lambda a: a.update(residual=torch.randn(6, 7)), ValueError, ["residual", "(6, 8)"]),
    ("residual dtype", lambda a: a.update(residual=torch.randn(6, 8, dtype=torch.float64)), TypeError,
     ["residual", "float64"]),
    ("negative eps", lambda a: a.update(eps=-1.0), ValueError, ["eps", "-1.0"]),
    ("x not a tensor", lambda a: a.update(x=[[1.0]]), TypeError, ["x", "list"]),
]


@pytest.mark.parametrize("op", [ops.modality_rms_norm, ops.modality_layer_norm], ids=["rms", "layer"])
@pytest.mark.parametrize("label,change,exc,words", BAD_NORM_INPUTS, ids=[c[0] for c in BAD_NORM_INPUTS])
def test_norm_bad_input(op, label, change, exc, words):
    x, modality, weight = _good()
    args = {"x": x, "modality": modality, "weight": weight}
    change(args)
    with pytest.raises(exc) as info:
        op(**args)
    for word in words:
        assert word in str(info.value), f"{label}: message {str(info.value)!r} lacks {word!r}"


def test_layer_norm_bad_bias():
    x, modality, weight = _good()
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 8\)"):
        ops.modality_layer_norm(x, modality, weight, torch.randn(8))


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 24, generator=gen).to(device).requires_grad_()
    residual = torch.randn(10, 24, generator=gen).to(device).requires_grad_()
    modality = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 0, 1], device=device)
    weight = torch.randn(3, 24, generator=gen).to(device).requires_grad_()
    bias = torch.randn(3, 24, generator=gen).to(device).requires_grad_()
    op = torch.ops.fastmm
    return [
        (op.modality_rms_norm.default, (x, modality, weight, None, 1e-6)),
        (op.modality_rms_norm.default, (x, modality, weight, residual, 1e-6)),
        (op.modality_layer_norm.default, (x, modality, weight, bias, None, 1e-5)),
        (op.modality_layer_norm.default, (x, modality, weight, None, residual, 1e-5)),
    ]


@pytest.mark.parametrize("backend,device", backend_cases())
def test_opcheck(backend, device):
    with fastmm.use_backend(backend):
        for op, args in _opcheck_cases(device):
            torch.library.opcheck(op, args)


def _norm_block(x, modality, norm_weight, residual):
    """Fused add + modality RMSNorm (an mPLUG-Owl2 layer's input norm), then a modality LayerNorm of its output."""
    h, residual = ops.modality_rms_norm(x, modality, norm_weight, 1e-6, residual)
    return ops.modality_layer_norm(h, modality, norm_weight), residual


@pytest.mark.parametrize("backend,device", backend_cases())
def test_compile_fullgraph(backend, device):
    """The ops are graph leaves under torch.compile(fullgraph=True): no graph break, same values, and
    gradients flow through the registered backward."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=gen).to(device)
    residual = torch.randn(2, 9, 16, generator=gen).to(device)
    modality = torch.randint(0, 2, (2, 9), generator=gen).to(device)
    norm_weight = torch.randn(2, 16, generator=gen).to(device).requires_grad_()
    with fastmm.use_backend(backend):
        compiled = torch.compile(_norm_block, fullgraph=True, backend="aot_eager")
        out, new_residual = compiled(x, modality, norm_weight, residual)
        out.sum().backward()
    grad = norm_weight.grad.clone()
    norm_weight.grad = None

    h, expected_residual = ref.modality_rms_norm(x, modality, norm_weight, 1e-6, residual)
    expected = ref.modality_layer_norm(h, modality, norm_weight)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(grad, norm_weight.grad, rtol=1e-4, atol=1e-4)


def test_compile_inductor_inference():
    """The default inductor backend, inference only (the decode path): one compile, kept short."""
    torch._dynamo.reset()
    x, modality, weight = _good(rows=12, hidden=32)
    compiled = torch.compile(lambda a, m, w: ops.modality_rms_norm(a, m, w) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, modality, weight), 2 * ref.modality_rms_norm(x, modality, weight))


def test_native_launcher_refuses_buffers_it_cannot_index():
    """The C++ kernels take raw pointers: the launcher itself rejects strided or mis-shaped buffers, even
    when called past fastmm.ops (as autograd's backward and torch.compile's graphs do)."""
    ok, reason = fastmm.backend.native_status()
    if not ok:
        pytest.skip(reason)
    from fastmm.native import norm as native

    x, modality, weight = _good()
    _, _, rstd = native.rms_norm_fwd(x, modality, weight, None, 1e-6)
    strided = torch.randn(8, 6).t()
    with pytest.raises(ValueError, match="dresidual_out must be a contiguous CPU"):
        native.rms_norm_bwd(torch.randn(6, 8), strided, x, modality, weight, rstd)
    with pytest.raises(ValueError, match=r"rstd .* shape \(6,\)"):
        native.rms_norm_bwd(torch.randn(6, 8), None, x, modality, weight, rstd[:5])
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 2\)"):
        native.rms_norm_fwd(x, torch.tensor([0, 1, 2, 0, 1, 0]), weight, None, 1e-6)
