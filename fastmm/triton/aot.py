"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, on a machine without a GPU.

Kernels join through ``register_aot`` next to their definition, with one ``AotConfig`` per launch
configuration they can run with (every autotune config, every dtype). ``compile_all`` compiles each one
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the resource usage
of the resulting cubin with the ``cuobjdump`` that ships inside triton: registers, local memory (spills)
and shared memory. The AOT test asserts no spills and shared memory within the SM limit; ``fastmm kernels
--aot`` prints the table.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
from typing import Any, Iterable

ARCHS = (80, 90)
# Shared memory one block may use (opt-in maximum), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One launch configuration of a kernel: argument types, constexpr values, warps and stages."""

    label: str  # human-readable, e.g. "bf16 BLOCK_D=4096"
    signature: dict[str, str]  # every argument: "*fp32", "*bf16", "i32", "i64", "fp32", or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class AotKernel:
    name: str
    kernel: Any  # triton.runtime.JITFunction
    configs: tuple[AotConfig, ...]


@dataclasses.dataclass(frozen=True)
class AotResult:
    kernel: str
    config: str
    arch: int
    registers: int
    shared: int  # bytes of shared memory per block (dynamic, as triton launches it, plus static)
    spills: int  # bytes of local memory per thread: register spills
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spills == 0 and self.shared <= SHARED_LIMIT[self.arch]


_REGISTRY: dict[str, AotKernel] = {}


def register_aot(kernel: Any, configs: Iterable[AotConfig]) -> None:
    """Register ``kernel`` (a @triton.jit function) with the launch configurations it can run with."""
    name = kernel.fn.__name__
    configs = tuple(configs)
    if not configs:
        raise ValueError(f"register_aot({name}): expected at least one AotConfig, got none")
    _REGISTRY[f"{kernel.fn.__module__}.{name}"] = AotKernel(name, kernel, configs)


def registered_kernels() -> list[AotKernel]:
    """Every registered kernel; imports each module of fastmm.triton first so that all of them register."""
    import fastmm.triton as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return list(_REGISTRY.values())


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", out)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return usage


def compile_one(entry: AotKernel, config: AotConfig, arch: int) -> AotResult:
    """Compile one kernel configuration for sm_<arch> and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(fn=entry.kernel, signature=config.signature, constexprs=config.constexprs)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # report every failure in the table rather than stopping at the first
        return AotResult(entry.name, config.label, arch, 0, 0, 0, error=f"{type(exc).__name__}: {exc}")
    shared = max(int(getattr(compiled.metadata, "shared", 0)), usage.get("SHARED", 0))
    return AotResult(entry.name, config.label, arch, usage["REG"], shared, usage.get("LOCAL", 0))


def compile_all(archs: Iterable[int] = ARCHS) -> list[AotResult]:
    """Compile every registered kernel with each of its configurations for each architecture."""
    return [
        compile_one(entry, config, arch)
        for entry in registered_kernels()
        for config in entry.configs
        for arch in archs
    ]
