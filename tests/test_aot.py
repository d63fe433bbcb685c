"""GPU proof without a GPU (DESIGN.md section 3): every registered Triton kernel, with each of its launch
configurations, compiles ahead of time for sm_80 and sm_90 with no register spills and shared memory
within the SM limit.

The tests run with TRITON_INTERPRET=1 (conftest), under which kernels cannot be compiled, so each kernel is
compiled by `fastmm kernels --aot --kernel NAME` in a child process without that variable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
aot = pytest.importorskip("fastmm.triton.aot")

KERNELS = aot.registered_kernels()


def test_every_family_registers_kernels():
    modules = {entry.kernel.fn.__module__ for entry in KERNELS}
    families = ("norm", "routed_linear", "span_attention", "decode_attention", "vq", "linear", "sampling")
    missing = [family for family in families if f"fastmm.triton.{family}" not in modules]
    assert not missing, f"families without AOT kernels: {missing}; registered modules: {sorted(modules)}"


@pytest.mark.parametrize("entry", KERNELS, ids=[entry.name for entry in KERNELS])
def test_kernel_compiles_without_spills(entry, tmp_path):
    report = tmp_path / "aot.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastmm.cli", "kernels", "--aot", "--kernel", entry.name, "--json", str(report)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), f"no AOT report (exit {run.returncode}):\n{run.stderr[-4000:]}"
    results = json.loads(report.read_text())
    assert len(results) == len(entry.configs) * len(aot.ARCHS)
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(
        f"{r['kernel']} [{r['config']}] sm_{r['arch']}: regs={r['registers']} shared={r['shared']} "
        f"spills={r['spills']} {r['error']}"
        for r in bad
    )
    assert run.returncode == 0, run.stderr[-4000:]


# The checks above pass only if the verdict can fail: a kernel that genuinely spills takes minutes to
# compile, so the verdict is tested on cuobjdump output of the kind ptxas writes for spilling kernels.
SPILLING = "Function _kernel:\nREG:255 STACK:2048 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0"
CLEAN = "Function _kernel:\nREG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0"


@pytest.mark.parametrize(
    "dump, shared, ok",
    [(CLEAN, 1024, True), (SPILLING, 0, False), (CLEAN.replace("LOCAL:0", "LOCAL:16"), 1024, False),
     (CLEAN, aot.SHARED_LIMIT[80] + 1, False)],
    ids=["clean", "stack-spill", "local-spill", "shared-over-limit"],
)
def test_verdict_fails_on_spills_and_shared_overflow(dump, shared, ok):
    usage = aot.parse_resource_usage(dump)
    assert aot.result_from_usage("_kernel", "cfg", 80, usage, shared).ok is ok


def test_unparseable_cuobjdump_output_is_an_error():
    with pytest.raises(RuntimeError, match="no resource usage"):
        aot.parse_resource_usage("cuobjdump info    : File 'x.cubin' does not contain device code")


def test_divisible_by_16_marks_names_and_prefixes():
    """The one way a family marks divisible integers: names, or "prefix*" for every integer argument with that
    prefix; an entry that marks nothing is refused (a renamed argument would silently lose its mark)."""
    signature = {"X": "*fp32", "stride_x_m": "i32", "stride_x_k": "i32", "stride_y": "i32", "N": "i32",
                 "eps": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    config = aot.AotConfig("probe", signature, {"BLOCK": 16}, divisible_by_16=("N", "stride_x_*"))
    assert config.divisible_integers() == ("stride_x_m", "stride_x_k", "N")
    assert aot.AotConfig("probe", signature, {}, divisible_by_16=("stride*",)).divisible_integers() == (
        "stride_x_m", "stride_x_k", "stride_y")
    for entry in ("eps", "M", "stride_z_*"):
        with pytest.raises(ValueError, match=re.escape(f"divisible_by_16 entry {entry!r} marks no integer")):
            aot.AotConfig("probe", signature, {}, divisible_by_16=(entry,)).divisible_integers()
