"""ModalityAttention: mPLUG-Owl2's attention block on fastmm ops, with Llama-convention RoPE (fastmm.nn.rope).

Q is shared by every modality; K and V go through routed_linear (one projection per modality, the
"modality-adaptive" part); prefill runs span_attention over key ranges, decoding runs decode_attention
against a static KVCache.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmm import ops
from fastmm.kv_cache import KVCache
from fastmm.nn.rope import apply_rope, rope_cos_sin
from fastmm.nn.routed_linear import RoutedLinear


class ModalityAttention(nn.Module):
    """forward(hidden [B, L, hidden], modality [B, L], positions [B, L], ...) -> [B, L, hidden]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_modalities: int = 2,
        rope_theta: float = 10000.0,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"ModalityAttention: num_heads {num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        self.rope_theta = rope_theta
        factory = {"device": device, "dtype": dtype}
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = RoutedLinear(num_modalities, hidden_size, kv_width, bias=bias, **factory)
        self.v_proj = RoutedLinear(num_modalities, hidden_size, kv_width, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias, **factory)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)

    def forward(
        self,
        hidden: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        kv_start: torch.Tensor | None = None,
        kv_end: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> torch.Tensor:
        """Two modes.

        Prefill (no cache, or key ranges given): span_attention over these L tokens with the ranges
        (default causal); with a cache, their K and V are also written at positions cache.lengths.
        Decode (a cache and no ranges): the L new tokens' K and V are written at cache.lengths, then they
        attend the whole valid cache with decode_attention.
        The caller advances cache.lengths by L once every layer has run (all layers share the lengths).
        """
        B, L, _ = hidden.shape
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        q = apply_rope(self._heads(self.q_proj(hidden), self.num_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(hidden, modality), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(hidden, modality), self.num_kv_heads)
        if cache is not None:
            cache.write(layer_index, k, v, cache.lengths)
        if cache is None or kv_start is not None:
            out = ops.span_attention(q, k, v, kv_start, kv_end)
        else:
            k_cache, v_cache = cache.layer(layer_index)
            out = ops.decode_attention(q, k_cache, v_cache, cache.lengths + L)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, H * d) -> (B, L, hidden)
