"""Every backend module of every op family against the family's declared kernels (fastmm.ops._spec.DECLARED):
the functions exist with the declared parameters in the same order, and fastmm.ops reaches backend modules only
through those declarations."""

from __future__ import annotations

import pathlib
import inspect
import re
import types

import pytest

from fastmm.ops._spec import DECLARED  # importing fastmm.ops declares every family's kernels

BACKENDS = ("reference", "native", "triton")
OPS = pathlib.Path(__file__).resolve().parents[1] / "fastmm" / "ops"
# Every public ops module is a family that declares kernels, except the fused decode step, whose backends each
# supply a DecodeLayerRunner (tests/test_decode_layer.py).
FAMILIES = tuple(sorted(p.stem for p in OPS.glob("*.py") if not p.stem.startswith("_") and p.stem != "decode_layer"))


def _mismatches(module, family: str, backend: str) -> list[str]:
    """How ``module`` (the ``backend`` module of ``family``) departs from the family's declared kernels."""
    wrong = []
    for declared in DECLARED[family]:
        function = getattr(module, declared.kernel, None)
        if function is None:
            if not declared.optional or backend == "reference":  # the reference is the fallback: it has everything
                wrong.append(f"{declared.kernel} is missing")
            continue
        got = tuple(p.name for p in inspect.signature(function).parameters.values())
        if got != declared.parameters:
            wrong.append(f"{declared.kernel}{got} is not {declared.kernel}{declared.parameters}")
    return wrong


def test_every_family_declares_its_kernels():
    assert sorted(DECLARED) == sorted(FAMILIES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_backend_module_implements_the_declared_kernels(family, backend):
    module = pytest.importorskip(f"fastmm.{backend}.{family}")
    wrong = _mismatches(module, family, backend)
    assert not wrong, f"fastmm.{backend}.{family}: " + "; ".join(wrong)


def test_only_the_spec_reaches_backend_modules():
    """fastmm.ops picks kernels in one place: no ops module but _dispatch / _spec calls the dispatch functions
    or imports a backend for its kernels."""
    offenders = []
    for path in OPS.glob("*.py"):
        if path.name in ("_dispatch.py", "_spec.py"):
            continue
        source = path.read_text()
        if re.search(r"\b(kernel_function|backend_module|choose_backend)\(", source):
            offenders.append(path.name)
    assert not offenders, f"dispatch outside fastmm.ops._spec: {offenders}"


def test_the_check_sees_a_mismatch():
    """Other parameters, or a missing function, are reported; an optional kernel may be missing outside the
    reference."""
    narrow = types.SimpleNamespace(linear_fwd=lambda x, weight: x)
    assert _mismatches(narrow, "linear", "native") == [
        "linear_fwd('x', 'weight') is not linear_fwd('x', 'weight', 'bias')"
    ]
    assert _mismatches(types.SimpleNamespace(), "vq", "triton") == ["nearest_code is missing"]
    forward_only = types.SimpleNamespace(span_attention_fwd=lambda q, k, v, kv_start, kv_end, scale, key_keep, mask,
                                         softcap: q, decode_attention_fwd=lambda q, k_cache, v_cache, cache_len,
                                         scale, mask, softcap: q)  # fmt: skip
    assert _mismatches(forward_only, "attention", "native") == []
    assert _mismatches(forward_only, "attention", "reference") == ["span_attention_bwd is missing"]
