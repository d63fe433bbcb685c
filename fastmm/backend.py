"""Backend choice for every op: reference (PyTorch), native (C++ in fastmm._C) or triton.

Default by device: CUDA tensors -> triton, CPU tensors -> native, anything else -> reference.
Override with the environment variable ``FASTMM_BACKEND=reference|native|triton`` or, for a block of
code, ``with fastmm.use_backend("reference"): ...`` (the context manager wins over the variable).

A backend that cannot run here (extension not built, triton missing, CPU tensors without
``TRITON_INTERPRET=1``) falls back to the next one that can, with one logged warning per fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from typing import Iterator

import torch

logger = logging.getLogger("fastmm")

BACKENDS = ("reference", "native", "triton")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastmm_backend", default=None)
_warned: set[tuple[str, str, str]] = set()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every fastmm op inside the block on backend ``name`` (where it can run)."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend asked for by use_backend() or FASTMM_BACKEND, or None for the default by device."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("FASTMM_BACKEND", "").strip()
    return _check_name(env, "FASTMM_BACKEND") if env else None


@functools.lru_cache(maxsize=None)
def native_status() -> tuple[bool, str]:
    """(available, reason): whether the C++ extension fastmm._C imports."""
    try:
        importlib.import_module("fastmm._C")
    except ImportError as exc:
        return False, f"extension fastmm._C not built ({exc})"
    return True, "ok"


@functools.lru_cache(maxsize=None)
def _triton_import_status() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return False, f"triton not importable ({exc})"
    return True, "ok"


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status(device: torch.device) -> tuple[bool, str]:
    """(available, reason): whether Triton kernels can run on tensors on ``device``."""
    ok, reason = _triton_import_status()
    if not ok:
        return ok, reason
    if device.type == "cuda":
        return True, "ok"
    if device.type == "cpu" and triton_interpret():
        return True, "ok (interpreter)"
    return False, f"triton needs CUDA tensors or TRITON_INTERPRET=1, got {device.type} tensors"


def backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason) of backend ``name`` for tensors on ``device``."""
    if name == "reference":
        return True, "ok"
    if name == "native":
        if device.type != "cpu":
            return False, f"native kernels run on CPU tensors, got {device.type} tensors"
        return native_status()
    return triton_status(device)


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "native"
    return "reference"


def choose_backend(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``: the requested one if it can run, else a fallback."""
    wanted = requested_backend() or default_backend(device)
    chosen, reason = _resolve(wanted, device.type, triton_interpret())
    if reason:
        warn_fallback(op, wanted, chosen, reason)
    return chosen


@functools.lru_cache(maxsize=None)
def _resolve(wanted: str, device_type: str, interpret: bool) -> tuple[str, str]:
    """(backend that runs, why it is not ``wanted`` or ""): what it depends on is the key, so the answer is
    computed once; every op of a decode step asks, and the uncached status checks cost microseconds each.
    ``interpret`` is part of the key because triton's availability on CPU tensors depends on it."""
    device = torch.device(device_type)
    ok, reason = backend_status(wanted, device)
    if ok:
        return wanted, ""
    fallback = default_backend(device)
    if fallback == wanted or not backend_status(fallback, device)[0]:
        fallback = "reference"
    return fallback, reason


def warn_fallback(op: str, wanted: str, fallback: str, reason: str) -> None:
    """Log once per (op, wanted, fallback) that ``op`` runs on ``fallback`` instead of ``wanted``."""
    key = (op, wanted, fallback)
    if key not in _warned:
        _warned.add(key)
        logger.warning("fastmm.%s: backend %r unavailable (%s); using %r", op, wanted, reason, fallback)
