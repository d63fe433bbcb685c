"""The machine's peaks, against which every benchmark row states its fraction: memory bandwidth and GEMM rate.

CPU peaks are measured on the spot (once per process): a virtual machine's share of a socket is known to no
table. GPU peaks come from the datasheets of known parts, matched by the name CUDA reports.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from fastmm.bench.timer import cpu_time


@dataclasses.dataclass(frozen=True)
class Peaks:
    device: str  # CPU model string or CUDA device name
    source: str  # how the figures were obtained: "measured ..." or "datasheet: <part>"
    bandwidth_gb_s: float | None  # memory bandwidth, GB/s (1e9 bytes/s); None for an unknown GPU
    gemm_gflop_s: dict[str, float]  # dtype name ("float32", "bfloat16", "float16") -> dense GEMM GFLOP/s
    fresh_copy_gb_s: float | None = None  # CPU: copy into a new buffer (page faults of the output included)


# Datasheet peaks: HBM / GDDR bandwidth (TB/s) and dense (no sparsity) tensor-core bf16 and plain fp32 FMA
# TFLOP/s. torch does not use TF32 for fp32 matmul by default, so fp32 GEMMs are held to the FMA peak.
# Matched in order, first hit wins: every name token must appear in torch.cuda.get_device_name() (lower case),
# so "H100 PCIe" is tried before the plain "H100" of the SXM part ("NVIDIA H100 80GB HBM3").
_GPU_PARTS: tuple[tuple[tuple[str, ...], str, float, float, float], ...] = (
    # (name tokens, part, TB/s, bf16 TFLOP/s, fp32 TFLOP/s)
    (("h200",), "H200", 4.8, 989.0, 67.0),
    (("h100", "pcie"), "H100 PCIe", 2.0, 756.0, 51.0),
    (("h100", "nvl"), "H100 NVL", 3.9, 835.0, 60.0),
    (("h100",), "H100 SXM", 3.35, 989.0, 67.0),
    (("a100", "pcie"), "A100 PCIe", 1.56, 312.0, 19.5),
    (("a100",), "A100 SXM", 2.0, 312.0, 19.5),
    (("l40s",), "L40S", 0.864, 362.0, 91.6),
    (("4090",), "RTX 4090", 1.0, 165.0, 82.6),
)


def gpu_peaks(name: str) -> Peaks:
    """Datasheet peaks of the CUDA device called ``name``; an unknown part gets no peaks (no % of peak)."""
    lowered = name.lower()
    for tokens, part, tb_s, bf16_tflops, fp32_tflops in _GPU_PARTS:
        if all(token in lowered for token in tokens):
            gemm = {"float32": fp32_tflops * 1e3, "bfloat16": bf16_tflops * 1e3, "float16": bf16_tflops * 1e3}
            return Peaks(name, f"datasheet: {part}", tb_s * 1e3, gemm)
    return Peaks(name, "unknown part: no datasheet peaks", None, {})


def cpu_model() -> str:
    """The CPU model string (Linux /proc/cpuinfo), or the platform's processor name elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _copy_gb_s(mib: int, fresh: bool) -> float:
    """read + write bytes / best time of a copy_ of ``mib`` MiB, into a kept buffer or into a fresh one."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = (lambda: torch.empty_like(src).copy_(src)) if fresh else (lambda: dst.copy_(src))
    timing = cpu_time(copy, min_reps=10)
    return 2 * src.numel() * 4 / (timing.min_ms * 1e-3) / 1e9


# A GEMM this long measures the peak well; the size grows to reach it (or n). Where the CPU has no fast path for
# a dtype (bf16 without AVX512_BF16 / AMX), a fixed 4096^3 product takes tens of minutes.
_GEMM_TARGET_S = 0.2


def _gemm_gflop_s(n: int, dtype: torch.dtype) -> float:
    size = min(n, 256)
    while True:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        torch.mm(a, b)
        if size >= n or time.perf_counter() - start >= _GEMM_TARGET_S:
            break
        size *= 2
    timing = cpu_time(lambda: torch.mm(a, b), min_time_s=0.0, min_reps=5)
    return 2 * size**3 / (timing.min_ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def cpu_peaks(copy_mib: int = 1024, gemm_n: int = 4096) -> Peaks:
    """Measure the CPU peaks with torch's own kernels at the current thread count (a few seconds, cached).
    Each figure is the best of several runs: a peak is what the machine can do, and on a shared machine the
    median would measure the neighbours too.

    Bandwidth: copy_ of a ``copy_mib`` fp32 buffer into a kept buffer, counting read + write bytes. 1 GiB per
    buffer is twice the largest L3 a VM reports to us (480 MiB) and far above any real one, so the copy streams
    from DRAM. Also reported, not used as the peak: the same copy into a freshly allocated buffer, what an op
    returning a new tensor can reach when the allocator maps fresh pages for it (see
    fastmm.bench.environment.keep_freed_memory: first-touch page faults cost more than the copy).
    GEMM: an n x n x n torch.mm in fp32 and in bf16 (AMX / AVX512-BF16 where the CPU has them), smaller where
    one product already takes _GEMM_TARGET_S (a CPU without a fast path for the dtype).
    """
    gemm = {"float32": _gemm_gflop_s(gemm_n, torch.float32), "bfloat16": _gemm_gflop_s(gemm_n, torch.bfloat16)}
    threads = torch.get_num_threads()
    source = f"measured, best run: copy_ of {copy_mib} MiB fp32, up to {gemm_n}^3 torch.mm, {threads} threads"
    return Peaks(cpu_model(), source, _copy_gb_s(copy_mib, fresh=False), gemm, _copy_gb_s(copy_mib, fresh=True))


def device_peaks(device: torch.device, quick: bool = False) -> Peaks:
    """Peaks of the machine behind ``device``. ``quick`` measures a CPU with small buffers (a smoke test's
    rough figure, below a second) instead of the real ones."""
    if device.type == "cuda":
        return gpu_peaks(torch.cuda.get_device_name(device))
    return cpu_peaks(64, 1024) if quick else cpu_peaks()
