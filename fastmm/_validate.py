"""Input checks shared by every op, the KV cache and the models (a leaf: it imports only torch). Each error names
the argument, what it got and what was expected.

Value checks (id ranges, NaN) read tensor contents, which on CUDA would cost a device-to-host sync at every
eager call. ``value_check_mode`` decides how each one runs:
- CPU tensors: read on the host, and a ValueError names the offending values (cheap on the CPU).
- CUDA tensors: a device-side assert (``assert_on_device``, torch._assert_async): the check runs on the stream
  with no host sync and a failure aborts the CUDA context at the next sync ("device-side assert triggered",
  the kernel printing the check's message). ``FASTMM_CHECK_VALUES=host`` reads them on the host instead, for
  the exact message, at the cost of a sync per check: a debugging switch.
- Nothing is checked while torch.compile traces or a CUDA graph is being captured: the check's kernels would
  run in every compiled call or graph replay. Kernels are written so that shape checks alone keep every
  access in bounds (triton clamps ids, native kernels check on the CPU).
"""

from __future__ import annotations

import os

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


CHECK_VALUES_ENV = "FASTMM_CHECK_VALUES"
CHECK_VALUES_MODES = ("device", "host")
# torch._assert_async copies its message into a fixed 255-byte buffer for the CUDA kernel and refuses longer ones.
_DEVICE_MESSAGE_MAX = 254


def cuda_check_mode() -> str:
    """How value checks on CUDA tensors run: FASTMM_CHECK_VALUES, "device" (default) or "host"."""
    mode = os.environ.get(CHECK_VALUES_ENV, "").strip() or "device"
    if mode not in CHECK_VALUES_MODES:
        raise ValueError(f"{CHECK_VALUES_ENV}: expected one of {CHECK_VALUES_MODES}, got {mode!r}")
    return mode


def value_check_mode(t: torch.Tensor) -> str | None:
    """How to check t's values in this call (see the module docstring): "host" (read them, exact message),
    "device" (assert_on_device, no host sync) or None (skip: torch.compile tracing, CUDA-graph capture, meta)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return None
    if t.device.type != "cuda":
        return "host"
    if torch.cuda.is_current_stream_capturing():
        return None
    return cuda_check_mode()


def values_checkable(t: torch.Tensor) -> bool:
    """Whether t's values are read on the host in this call: value_check_mode(t) == "host"."""
    return value_check_mode(t) == "host"


def assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Assert that every element of the bool tensor ``ok`` is True without a host sync. On CUDA a failure
    surfaces at the next sync as "device-side assert triggered", the kernel printing ``message``; on CPU it
    raises RuntimeError(message) at once. Write ``message`` as "<op>: <argument> must be <expected>"; the
    hint to FASTMM_CHECK_VALUES=host is appended here."""
    hinted = f"{message} (device-side check; {CHECK_VALUES_ENV}=host shows the values)"
    torch._assert_async(ok.all(), hinted[:_DEVICE_MESSAGE_MAX])


def _id_range(op: str, name: str, upper: int, upper_name: str) -> str:
    return f"{op}: {name} must be in [0, {upper}) ({upper_name})"


def check_id_range(op: str, name: str, ids: torch.Tensor, upper: int, upper_name: str) -> None:
    """Every id in [0, upper): read on the host, or asserted on the device (see value_check_mode)."""
    mode = value_check_mode(ids) if ids.numel() else None
    if mode == "device":
        wide = ids.long()  # no copy for int64; a narrower dtype would wrap an out-of-range bound
        assert_on_device((wide >= 0) & (wide < upper), _id_range(op, name, upper, upper_name))
    elif mode == "host":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{_id_range(op, name, upper, upper_name)}, got values in [{lo}, {hi}]")


def check_eps(op: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """No NaN or inf in t: read on the host, or asserted on the device (see value_check_mode)."""
    mode = value_check_mode(t) if t.numel() else None
    if mode == "device":
        assert_on_device(torch.isfinite(t), f"{op}: {name} must be finite (no NaN or inf)")
    elif mode == "host":
        # One reduction answers for the common case (a sum is finite only if every entry is); the exact count,
        # three passes and a copy, runs only when the sum is not finite (NaN, inf, or an overflowing sum).
        if torch.isfinite(t.sum()):  # in t's dtype: no widened copy (an fp16 sum may overflow: the exact path decides)
            return
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{op}: {name} must be finite, got {bad} NaN or inf entries in {describe(t)}")
