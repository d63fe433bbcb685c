"""What every native launcher shares with csrc/common.h."""

from typing import NoReturn

import torch

# fastmm::DType codes (csrc/common.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Below this many elements of work per thread, a parallel region costs more than it saves (it is a few
# microseconds on idle cores, and a scheduler time slice on busy ones): decode-sized calls stay on one thread.
MIN_WORK_PER_THREAD = 32768


def threads_for(work: int) -> int:
    """OpenMP threads for a call touching ``work`` elements: torch's thread count, fewer for small calls."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


# ---- the last guard before raw pointers reach C++ -------------------------------------------------------
# Every launcher checks the tensors it hands to fastmm._C here, even those fastmm.ops already validated: a
# launcher can be called past ops (torch.compile's graphs, tests, benchmarks), and C++ never bounds-checks.


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer C++ receives for an optional tensor: 0 for None."""
    return 0 if t is None else t.data_ptr()


def fail(kernel: str, name: str, expected: str, t: torch.Tensor) -> NoReturn:
    """Raise the launchers' ValueError: "native <kernel> kernel: <name> must be <expected>, got <what t is>"."""
    raise ValueError(
        f"native {kernel} kernel: {name} must be {expected}, got {t.dtype} shape {tuple(t.shape)} "
        f"strides {t.stride()} on {t.device}"
    )


def check_contiguous(kernel: str, **buffers: tuple[torch.Tensor | None, tuple[int, ...], torch.dtype]) -> None:
    """Each given tensor (None: absent, skipped) is contiguous on the CPU with the given shape and dtype."""
    for name, (t, shape, dtype) in buffers.items():
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape
                              or t.dtype != dtype):  # fmt: skip
            fail(kernel, name, f"a contiguous CPU {dtype} tensor of shape {shape}", t)


def inside_storage(t: torch.Tensor) -> bool:
    """Whether every element t addresses through its (non-negative) strides lies inside its storage."""
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size() <= t.untyped_storage().nbytes()
