"""Input checks shared by every op. Each error names the argument, what it got and what was expected.

Value checks (id ranges, NaN) read tensor contents. On CPU that is cheap; on CUDA it costs a device-to-host
sync, so they are skipped while a CUDA graph is being captured or torch.compile is tracing (a decode step
must never sync). Kernels are written so that shape checks alone keep every access in bounds on CPU.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_ids(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{op}: {name} must hold integer ids, got {t.dtype}")


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got {describe(t)}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} ({layout}), got {describe(t)}")


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {reference_name} is on {reference.device}; "
                "expected every tensor on one device"
            )


def values_checkable(t: torch.Tensor) -> bool:
    """Whether reading t's values is free of a host sync that would break graph capture or compilation."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return t.device.type != "meta"


def check_id_range(op: str, name: str, ids: torch.Tensor, upper: int, upper_name: str) -> None:
    """Every id in [0, upper); skipped where reading values would sync a capture (see module docstring)."""
    if ids.numel() == 0 or not values_checkable(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{op}: {name} must be in [0, {upper}) ({upper_name}), got values in [{lo}, {hi}]")


def check_eps(op: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """No NaN or inf in t; skipped where reading values would sync a capture (see module docstring)."""
    if t.numel() == 0 or not values_checkable(t):
        return
    # One reduction answers for the common case (a sum is finite only if every entry is); the exact count,
    # three passes and a copy, runs only when the sum is not finite (NaN, inf, or an overflowing sum).
    if torch.isfinite(t.sum()):  # in t's dtype: no widened copy (an fp16 sum may overflow: the exact path decides)
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{op}: {name} must be finite, got {bad} NaN or inf entries in {describe(t)}")
