"""Capture a decode step as one CUDA graph.

A decode step is a few hundred small kernel launches; replaying them as one graph removes the launch and
Python overhead that dominates small-batch decoding. The step must be a function of static buffers (it reads
and writes the same tensors on every call) and must never sync the host (fastmm ops skip their value checks
while a capture is running).
"""

from __future__ import annotations

import gc
from typing import Callable, Sequence

import torch

WARMUP_STEPS = 2  # the first call compiles Triton kernels and sizes the allocator's pools


def capture_step(step: Callable[[], None], buffers: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """Warm ``step`` up on a side stream, capture it once, and return the graph (``graph.replay()`` runs it).

    ``buffers`` are the tensors the step advances (cache lengths, counters, its inputs): their contents are
    restored after the warm-up calls, so the first replay continues exactly where the caller left off.
    Writes the warm-up made elsewhere (KV-cache rows past the valid lengths) are overwritten before they are
    read. The garbage collector is off during capture: a collection freeing a CUDA tensor mid-capture would
    corrupt the graph's memory pool.
    """
    saved = [b.clone() for b in buffers]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
    graph = torch.cuda.CUDAGraph()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            step()
    finally:
        gc.enable()
    return graph
