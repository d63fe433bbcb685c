"""What every native launcher shares with csrc/common.h."""

import torch

# fastmm::DType codes (csrc/common.h), for the one entry point that takes raw pointers (decode_layer).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Below this many elements of work per thread, a parallel region costs more than it saves (it is a few
# microseconds on idle cores, and a scheduler time slice on busy ones): decode-sized calls stay on one thread.
MIN_WORK_PER_THREAD = 32768


def threads_for(work: int) -> int:
    """OpenMP threads for a call touching ``work`` elements: torch's thread count, fewer for small calls."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer decode_layer receives for an optional tensor: 0 for None."""
    return 0 if t is None else t.data_ptr()
