"""What a result depends on besides the code under test: versions, commit, machine, time."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess

import torch

from fastmm.bench.roofline import Peaks, cpu_model


@dataclasses.dataclass(frozen=True)
class Environment:
    timestamp: str  # ISO 8601, UTC
    git_sha: str | None  # HEAD of the checkout fastmm runs from, "-dirty" with uncommitted changes; None outside git
    versions: dict[str, str]  # fastmm, torch, triton, python, numpy, cuda
    cpu: str  # CPU model string
    device: str  # the benchmarked device: "cpu" or the CUDA device name
    threads: int  # torch.get_num_threads()
    # 1/5/15-minute load average at the start: other processes on the cores make CPU figures noisy
    load_avg: tuple[float, float, float] | None
    peaks: Peaks  # the roofline every row's % of peak refers to
    allocator: str  # how host memory was handed out during the run (see keep_freed_memory)


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> str:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS; returns what was done.

    By default glibc hands every allocation above 32 MiB out as a fresh mmap and unmaps it on free, so each
    call of an op with a large output (a [8192, 4096] fp32 norm output is 128 MiB) page-faults its output in
    again: on a VM that costs more than the op itself, and it varies with the allocator's history. A serving
    process does not pay it (jemalloc / tcmalloc, or PyTorch's caching allocator on GPU), so the benchmark
    measures kernels with freed memory kept: mmap off (M_MMAP_MAX = 0), trimming above 1 GiB only.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc: freed memory may be returned to the OS)"
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30)):
        return "glibc default (mallopt failed)"
    return "glibc malloc, freed memory kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)"


def versions() -> dict[str, str]:
    import fastmm

    found = {"fastmm": fastmm.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for package in ("triton", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["cuda"] = torch.version.cuda or "none (CPU build of torch)"
    return found


def git_sha() -> str | None:
    """Read-only git queries against the directory fastmm is imported from."""
    import fastmm

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastmm.__file__)))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=root, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def capture(device: torch.device, peaks: Peaks, allocator: str) -> Environment:
    return Environment(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_sha=git_sha(),
        versions=versions(),
        cpu=cpu_model(),
        device=device_name(device),
        threads=torch.get_num_threads(),
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
        peaks=peaks,
        allocator=allocator,
    )
