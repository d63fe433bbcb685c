"""GPU proof without a GPU (DESIGN.md section 3): every registered Triton kernel, with each of its launch
configurations, compiles ahead of time for sm_80 and sm_90 with no register spills and shared memory
within the SM limit."""

from __future__ import annotations

import pytest

aot = pytest.importorskip("fastmm.triton.aot")
pytest.importorskip("triton")

KERNELS = aot.registered_kernels()


def test_every_family_registers_kernels():
    modules = {entry.kernel.fn.__module__ for entry in KERNELS}
    assert "fastmm.triton.norm" in modules, f"registered modules: {sorted(modules)}"


@pytest.mark.parametrize("entry", KERNELS, ids=[entry.name for entry in KERNELS])
def test_kernel_compiles_without_spills(entry):
    results = [aot.compile_one(entry, config, arch) for config in entry.configs for arch in aot.ARCHS]
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(
        f"{r.kernel} [{r.config}] sm_{r.arch}: regs={r.registers} shared={r.shared} spills={r.spills} {r.error}"
        for r in bad
    )
