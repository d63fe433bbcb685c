"""Peak memory of the profiled runs (warm-up and measured runs together: a warm-up leaves the memory it grew
to, so growth over the measured run alone would read zero on the CPU).

CUDA: the caching allocator's high-water mark (torch.cuda.max_memory_allocated after a reset, as
fastmm.bench.memory measures it). CPU: the process's resident set size (RSS, from /proc/self/statm) sampled on
a thread: it counts all memory (torch's allocator, the C++ kernels' scratch, Python objects), moves in pages
and can miss a peak shorter than the sampling interval. (bench.memory's CPU figure runs the call under
torch.profiler, whose overhead would distort the run's timings.)

Both are reported as ``peak_bytes``, the growth beyond what was held before the runs (the loaded model's
weights are not counted: the runs' activations, KV caches, buffers, graphs), and ``total_peak_bytes``, weights
included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from fastmm.bench.memory import peak_torch_allocation
from fastmm.profiling.telemetry import PeriodicSampler

T = TypeVar("T")
RSS_INTERVAL_S = 0.01  # a sampler thread waking more often competes with the kernels for the cores
_STATM = Path("/proc/self/statm")


def _rss_bytes() -> int:
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak(fn: Callable[[], T], device: torch.device) -> tuple[T, dict[str, Any]]:
    """(fn(), the report's memory entry: peak_bytes, total_peak_bytes, their MiB and how they were measured)."""
    if device.type == "cuda":
        results: list[T] = []
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            peak = peak_torch_allocation(lambda: results.append(fn()), device)
        return results[0], _entry(peak, before + peak, "torch.cuda.max_memory_allocated (the caching allocator)")
    if not _STATM.is_file():
        return fn(), _entry(None, None, "unavailable: no /proc/self/statm on this system")
    before = _rss_bytes()
    sampler = PeriodicSampler(_rss_bytes, RSS_INTERVAL_S)
    sampler.start()
    try:
        result = fn()
    finally:
        samples = sampler.stop()
    top = max(rss for _, rss in samples)
    how = f"resident set size of the process, sampled every {1e3 * RSS_INTERVAL_S:g} ms (/proc/self/statm)"
    return result, _entry(max(0, top - before), top, how)


def _entry(peak: int | None, total: int | None, measure: str) -> dict[str, Any]:
    mib = lambda n: None if n is None else n / 2**20  # noqa: E731
    return {"peak_bytes": peak, "peak_mib": mib(peak), "total_peak_bytes": total, "total_peak_mib": mib(total),
            "measure": measure}  # fmt: skip
