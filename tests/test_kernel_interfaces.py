"""Every backend module of every op family against its kernel interface (fastmm.ops._interfaces): the functions
the Protocol declares exist with the same parameters in the same order, and fastmm.ops calls nothing on a kernel
module that the Protocol does not declare."""

from __future__ import annotations

import inspect
import pathlib
import re
import types

import pytest

from fastmm.ops._interfaces import INTERFACES

BACKENDS = ("reference", "native", "triton")
OPS = pathlib.Path(__file__).resolve().parents[1] / "fastmm" / "ops"


def _declared(protocol: type) -> dict[str, list[str]]:
    """Method name -> parameter names (self dropped) of a Protocol."""
    return {
        name: list(inspect.signature(member).parameters)[1:]
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def _mismatches(module, family: str, backend: str) -> list[str]:
    """How ``module`` (the ``backend`` module of ``family``) departs from the family's Protocol."""
    protocol, optional = INTERFACES[family]
    wrong = []
    for name, parameters in _declared(protocol).items():
        function = getattr(module, name, None)
        if function is None:
            if name not in optional or backend == "reference":  # the reference is the fallback: it has everything
                wrong.append(f"{name} is missing")
            continue
        got = [p.name for p in inspect.signature(function).parameters.values()]
        if got != parameters:
            wrong.append(f"{name}{tuple(got)} is not {name}{tuple(parameters)}")
    return wrong


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", INTERFACES)
def test_backend_module_implements_the_interface(family, backend):
    module = pytest.importorskip(f"fastmm.{backend}.{family}")
    wrong = _mismatches(module, family, backend)
    assert not wrong, f"fastmm.{backend}.{family} against {INTERFACES[family][0].__name__}: " + "; ".join(wrong)


def test_ops_call_only_declared_kernel_functions():
    """Every `kernels(...).f(`, `module.f(` and `getattr(module, "f"` in fastmm.ops names a declared function."""
    declared = {name for protocol, _ in INTERFACES.values() for name in _declared(protocol)}
    called = set()
    for path in OPS.glob("*.py"):
        source = path.read_text()
        called |= set(re.findall(r"kernels\([^()]*(?:\([^()]*\))?[^()]*\)\.(\w+)\(", source))
        called |= set(re.findall(r"\bmodule\.(\w+)\(", source))
        called |= set(re.findall(r"getattr\(module, \"(\w+)\"", source))
    assert called, "the pattern found no kernel call in fastmm/ops: the test would check nothing"
    assert called <= declared, f"called on kernel modules but not declared: {sorted(called - declared)}"


def test_the_check_sees_a_mismatch():
    """Other parameters, or a missing function, are reported; an optional function may be missing outside the
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
