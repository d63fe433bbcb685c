"""From (op family, device) to the module of kernels that runs it, and when to go through torch.library.

Every backend module of a family (fastmm.reference.<family>, fastmm.native.<family>,
fastmm.triton.<family>) exposes the same kernel-level functions over flattened, contiguous tensors, so the
ops layer only picks a module.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from fastmm.backend import choose_backend


@functools.lru_cache(maxsize=None)
def _module(backend: str, family: str) -> ModuleType:
    return importlib.import_module(f"fastmm.{backend}.{family}")


def kernels(family: str, op: str, device: torch.device) -> ModuleType:
    """The kernel module of ``family`` on the backend chosen for ``op`` on ``device``."""
    return _module(choose_backend(op, device), family)


def use_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """True when the call must go through the registered custom op: under torch.compile (the op is a leaf
    of the graph) or when autograd must record it. Otherwise the eager call skips the dispatcher, whose
    tens of microseconds matter for batch-1 decode."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
