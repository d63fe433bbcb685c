"""torch.profiler Chrome traces of a profiled run, and profiler ranges that cost nothing when none records.

fastmm's eager ops call their kernels without the torch dispatcher; while a profiler records, each such call
is a range named ``fastmm::<op>`` (fastmm.ops._dispatch), and the stages of a profiled run are ranges named
``fastmm/<stage>``. Open the file in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def recording() -> bool:
    """True while a torch profiler (or emit_nvtx) records on this thread."""
    return torch._C._autograd._profiler_enabled()


@contextlib.contextmanager
def profiler_range(name: str) -> Iterator[None]:
    """A profiler range called ``name`` around the block while a profiler records, else nothing."""
    if not recording():
        yield
        return
    with record_function(name):
        yield


@contextlib.contextmanager
def chrome_trace(path: Path, device: torch.device) -> Iterator[None]:
    """Record the block with torch.profiler (CPU, plus CUDA kernels on a CUDA device) and write the Chrome
    trace to ``path``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorder:
        yield
    path.parent.mkdir(parents=True, exist_ok=True)
    recorder.export_chrome_trace(str(path))


def fastmm_ranges(path: Path) -> dict[str, int]:
    """How many times each fastmm range (``fastmm::<op>``, ``fastmm/<stage>``) occurs in the trace at ``path``."""
    events = json.loads(path.read_text())["traceEvents"]
    names = (event.get("name", "") for event in events if event.get("ph") == "X")
    return dict(sorted(collections.Counter(name for name in names if name.startswith("fastmm")).items()))
