"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, on a machine without a GPU.

Kernels join through ``register_aot`` next to their definition, with one ``AotConfig`` per launch
configuration they can run with (every autotune config, every dtype). ``compile_all`` compiles each one
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the resource usage
of the resulting cubin with the ``cuobjdump`` that ships inside triton: registers, spills (the stack frame
plus local memory: recent ptxas reports spilled registers as STACK) and shared memory. The AOT test asserts
no spills and shared memory within the SM limit; ``fastmm kernels --aot`` prints the table.

Each configuration is compiled with the specialization the JIT picks for the shapes that matter: every
pointer 16-byte aligned (as torch allocates) and the integer arguments named in ``divisible_by_16``
(strides and widths of real models: 1024, 4096, ...) marked divisible by 16. That field is the one way a
family marks them: argument names, or patterns ending in ``*`` for every integer argument with that prefix
("stride*": every stride; "stride_q_*": q's strides). Odd widths make the JIT compile a less specialized
variant, which this check does not cover.

Compilation needs the real JIT functions: under ``TRITON_INTERPRET=1`` triton.jit returns interpreter
objects that cannot be compiled, so run it in a process without that variable (the test does).
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
    # Integer arguments the JIT sees divisible by 16 at real sizes: names, or "prefix*" for every integer
    # argument whose name starts with prefix. Resolved against the signature (divisible_integers).
    divisible_by_16: tuple[str, ...] = ()

    def divisible_integers(self) -> tuple[str, ...]:
        """The integer arguments divisible_by_16 marks, in signature order; a name or pattern that marks no
        integer argument is an error (a renamed argument would otherwise silently drop its mark)."""
        marked = []
        for entry in self.divisible_by_16:
            prefix = entry[:-1] if entry.endswith("*") else None
            found = [name for name, kind in self.signature.items() if kind in ("i32", "i64")
                     and (name.startswith(prefix) if prefix is not None else name == entry)]  # fmt: skip
            if not found:
                raise ValueError(f"AotConfig {self.label!r}: divisible_by_16 entry {entry!r} marks no integer argument")
            marked += found
        return tuple(name for name in self.signature if name in marked)


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
    spills: int  # bytes per thread of stack frame and local memory: register spills
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
    return parse_resource_usage(out)


def parse_resource_usage(cuobjdump_output: str) -> dict[str, int]:
    """The REG, SHARED, LOCAL and STACK counts of ``cuobjdump --dump-resource-usage`` output."""
    pairs = re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", cuobjdump_output)
    usage = {key: int(value) for key, value in pairs}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{cuobjdump_output}")
    return usage


def _alignment(config: AotConfig) -> dict[tuple[int, ...], list[list[Any]]]:
    """ASTSource attributes marking aligned pointers and divisible integers, as the JIT specializes them."""
    divisible = config.divisible_integers()
    return {
        (index,): [["tt.divisibility", 16]]
        for index, (name, kind) in enumerate(config.signature.items())
        if kind.startswith("*") or name in divisible
    }


def compile_one(entry: AotKernel, config: AotConfig, arch: int) -> AotResult:
    """Compile one kernel configuration for sm_<arch> and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(
            fn=entry.kernel, signature=config.signature, constexprs=config.constexprs, attrs=_alignment(config)
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # report every failure in the table rather than stopping at the first
        return AotResult(entry.name, config.label, arch, 0, 0, 0, error=f"{type(exc).__name__}: {exc}")
    shared = max(int(getattr(compiled.metadata, "shared", 0)), usage.get("SHARED", 0))
    return result_from_usage(entry.name, config.label, arch, usage, shared)


def result_from_usage(kernel: str, config: str, arch: int, usage: dict[str, int], shared: int) -> AotResult:
    """Spills are the stack frame plus local memory: recent ptxas reports spilled registers as STACK."""
    spills = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    return AotResult(kernel, config, arch, usage["REG"], shared, spills)


def compile_all(archs: Iterable[int] = ARCHS, kernel: str | None = None) -> list[AotResult]:
    """Compile every registered kernel (or only the one named ``kernel``) with each of its configurations
    for each architecture."""
    entries = [entry for entry in registered_kernels() if kernel is None or entry.name == kernel]
    if kernel is not None and not entries:
        names = sorted(entry.name for entry in registered_kernels())
        raise ValueError(f"compile_all(kernel): no registered kernel named {kernel!r}; registered: {names}")
    return [compile_one(entry, config, arch) for entry in entries for config in entry.configs for arch in archs]
