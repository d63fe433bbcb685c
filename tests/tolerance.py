"""The error-ratio rule (flash-attention, quack): a kernel's error against ground truth (the reference in
fp64) may be at most twice the error of the plain-PyTorch reference run at the input's precision, plus a
small floor per dtype, scaled by the magnitude of the result."""

from __future__ import annotations

import torch

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_error_ratio(name: str, out: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor) -> None:
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    truth64 = truth.double().cpu()
    err = (out.double().cpu() - truth64).abs().max().item()
    base_err = (baseline.double().cpu() - truth64).abs().max().item()
    scale = max(1.0, truth64.abs().max().item())
    allowed = 2 * base_err + FLOOR[baseline.dtype if baseline.dtype in FLOOR else torch.float32] * scale
    assert err <= allowed, (
        f"{name}: max error {err:.3g} vs truth exceeds 2 x reference error {base_err:.3g} + floor "
        f"(allowed {allowed:.3g})"
    )
