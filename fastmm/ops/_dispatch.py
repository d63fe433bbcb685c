"""From (op family, op, kernel, device) to the function that runs it.

Every backend module of a family (fastmm.reference.<family>, fastmm.native.<family>,
fastmm.triton.<family>) implements the kernels the family declares (fastmm.ops._spec) over flattened,
contiguous tensors, so dispatch only picks a module and reads the kernel from it.

Eager calls skip the dispatcher, so torch.profiler would not see them. While a profiler records (and only
then: the check is one flag read), the kernel comes wrapped in a profiler range named ``fastmm::<op>``, the
name the registered custom op has under torch.compile.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from fastmm.backend import choose_backend


@functools.lru_cache(maxsize=None)
def backend_module(backend: str, family: str) -> ModuleType:
    return importlib.import_module(f"fastmm.{backend}.{family}")


def _recorded(function: Callable[..., Any], op: str) -> Callable[..., Any]:
    name = f"fastmm::{op}"

    @functools.wraps(function)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return function(*args, **kwargs)

    return recorded


def kernel_function(family: str, op: str, kernel: str, device: torch.device) -> Callable[..., Any]:
    """``kernel`` of ``family`` on the backend chosen for ``op`` on ``device``; the reference's where that
    backend leaves the kernel out (fastmm.ops._spec: declared optional). Recorded as ``fastmm::<op>`` while a
    torch profiler is active."""
    function = getattr(backend_module(choose_backend(op, device), family), kernel, None)
    if function is None:
        function = getattr(backend_module("reference", family), kernel)
    if torch._C._autograd._profiler_enabled():
        return _recorded(function, op)
    return function


@functools.lru_cache(maxsize=None)
def _implementation(backend: str, family: str, kernel: str) -> Callable[..., Any] | None:
    try:
        module = backend_module(backend, family)
    except ModuleNotFoundError as missing:
        if missing.name != f"fastmm.{backend}.{family}":
            raise  # the module exists but an import inside it failed: that is a bug to show, not a gap
        return None
    return getattr(module, kernel, None)


def implementation(family: str, op: str, kernel: str, device: torch.device) -> Callable[..., Any] | None:
    """``kernel`` of ``family`` on the backend chosen for ``op`` on ``device``, or None where that backend does
    not implement it: for ops whose fallback is the caller's own code rather than the reference (the fused
    decode step, whose fallback is the decoder's layer loop)."""
    return _implementation(choose_backend(op, device), family, kernel)
