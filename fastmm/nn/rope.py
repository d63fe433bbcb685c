"""Rotary position embedding, Llama convention (frequency i pairs dimension i with dimension i + d/2): the one
RoPE of fastmm. nn.ModalityAttention and the unified model's decoder use it; the native fused decode step
(csrc/decode_layer.cpp) reads the tables built here and rotates with the same fp32 arithmetic as
``apply_rope`` (tests/test_decode_layer.py holds the two paths together, tests/test_rope.py holds this module
to transformers' Llama RoPE).

The angles use transformers' exact arithmetic, 1 / theta^(2i/d) then position * inv_freq in fp32, so that fp32
results match transformers bit for bit.
"""

from __future__ import annotations

import torch


def _inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rope_table(max_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] fp32: the rows of positions 0 .. max_positions - 1."""
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    return _cos_sin(positions[:, None] * _inverse_frequencies(head_dim, theta)[None, :])


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, L, head_dim] fp32 for integer positions [B, L]: the rows rope_table holds for them."""
    angles = positions.float()[..., None] * _inverse_frequencies(head_dim, theta, positions.device)  # (B, L, d/2)
    cos, sin = _cos_sin(angles)
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d] rotated by (cos, sin) [B, 1, L, d]; math in fp32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
