"""Peak memory that one call of a provider allocates through torch, on CPU or CUDA.

CPU: torch.profiler with profile_memory records every allocation and free of torch's CPU allocator; the
peak of their running sum is the high-water mark of the call. CUDA: the caching allocator's peak counter.
Memory a library allocates by itself (FAISS's buffers, std::vector inside C++ code) is not seen: rows whose
provider does so say it in their note.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_torch_allocation(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes: the most that ``fn()`` held allocated at once, counting its outputs, beyond what was allocated
    before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in changes:  # frees are negative
        held += nbytes
        peak = max(peak, held)
    return peak
