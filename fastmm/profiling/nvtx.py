"""NVTX ranges (Nsight Systems shows them on the timeline) around the stages of a profiled run, on CUDA only.

On a CPU run, or with a CPU-only build of torch, a range is a no-op: nothing is imported or called.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def nvtx_range(name: str, device: torch.device) -> Iterator[None]:
    """An NVTX range called ``name`` around the block when ``device`` is a CUDA device, else nothing."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
