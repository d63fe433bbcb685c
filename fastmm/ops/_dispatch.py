"""From (op family, device) to the module of kernels that runs it, and when to go through torch.library.

Every backend module of a family (fastmm.reference.<family>, fastmm.native.<family>,
fastmm.triton.<family>) exposes the same kernel-level functions over flattened, contiguous tensors, so the
ops layer only picks a module.

Eager calls skip the dispatcher, so torch.profiler would not see them. While a profiler records (and only
then: the check is one flag read), ``kernels`` returns the module wrapped so that each kernel call is a
profiler range named ``fastmm::<op>``, the name the registered custom op has under torch.compile.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch

from fastmm.backend import choose_backend


@functools.lru_cache(maxsize=None)
def _module(backend: str, family: str) -> ModuleType:
    return importlib.import_module(f"fastmm.{backend}.{family}")


class _Recorded:
    """A kernel module whose functions run inside a torch.profiler range ``fastmm::<op>``."""

    __slots__ = ("_module", "_name")

    def __init__(self, module: ModuleType, op: str):
        self._module, self._name = module, f"fastmm::{op}"

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._module, attr)
        if not callable(value):
            return value
        name = self._name

        @functools.wraps(value)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(name):
                return value(*args, **kwargs)

        return recorded


def kernels(family: str, op: str, device: torch.device) -> ModuleType:
    """The kernel module of ``family`` on the backend chosen for ``op`` on ``device`` (its calls recorded as
    ``fastmm::<op>`` while a torch profiler is active)."""
    module = _module(choose_backend(op, device), family)
    if torch._C._autograd._profiler_enabled():
        return _Recorded(module, op)  # type: ignore[return-value]
    return module


def use_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """True when the call must go through the registered custom op: under torch.compile (the op is a leaf
    of the graph) or when autograd must record it. Otherwise the eager call skips the dispatcher, whose
    tens of microseconds matter for batch-1 decode."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
