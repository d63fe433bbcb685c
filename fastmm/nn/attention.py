"""ModalityAttention: the one attention block of fastmm, on fastmm ops, with Llama-convention RoPE
(fastmm.nn.rope). nn users build it directly; the unified model's decoder layers are built from it.

Projections: Q is shared by every modality. K and V are one fused projection: with ``modality_kv`` (mPLUG-Owl2's
"modality-adaptive" attention) a routed_linear with one weight per modality, ``kv_proj``; without, q, k and v
are one GEMM, ``qkv_proj`` (rows q, then k, then v), where Llama runs three. Prefill runs span_attention over key
ranges; decoding runs decode_attention against a static KVCache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastmm import ops
from fastmm.kv_cache import KVCache
from fastmm.nn.linear import Linear
from fastmm.nn.rope import apply_rope, rope_cos_sin
from fastmm.nn.routed_linear import RoutedLinear


class AttentionStats(NamedTuple):
    """What a prefill's attention hands out on request for scoring its keys (fastmm.ops.attention_importance)."""

    q: torch.Tensor  # [B, Hq, L, d], RoPE applied
    k: torch.Tensor  # [B, Hkv, L, d], RoPE applied
    lse: torch.Tensor  # [B, Hq, L] fp32, the softmax log-sum-exp of every query


class ModalityAttention(nn.Module):
    """forward(hidden [B, L, hidden], modality [B, L], positions [B, L], ...) -> [B, L, hidden]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_modalities: int = 2,
        modality_kv: bool = True,
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
        self.modality_kv = modality_kv
        factory = {"device": device, "dtype": dtype}
        q_width, kv_width = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if modality_kv:
            self.q_proj = Linear(hidden_size, q_width, bias=bias, **factory)
            self.kv_proj = RoutedLinear(num_modalities, hidden_size, 2 * kv_width, bias=bias, **factory)  # rows k, v
        else:
            self.qkv_proj = Linear(hidden_size, q_width + 2 * kv_width, bias=bias, **factory)
        self.o_proj = Linear(q_width, hidden_size, bias=bias, **factory)

    def _project(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """q, k, v side by side: [B, L, (Hq + 2 Hkv) d]."""
        if not self.modality_kv:
            return self.qkv_proj(x)
        return torch.cat([self.q_proj(x), self.kv_proj(x, modality)], dim=-1)

    def forward(
        self,
        hidden: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_start: torch.Tensor | None = None,
        kv_end: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefill: bool | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
        """Two modes.

        Prefill (``prefill``; by default when there is no cache or key ranges are given): span_attention over
        these L tokens with the ranges (default causal); with a cache, their K and V are also written at
        cache.lengths[layer_index]. ``return_stats`` also returns AttentionStats (q, k and the log-sum-exp).
        Decode (a cache and not prefill): the L new tokens' K and V are written at cache.lengths[layer_index],
        then they attend that layer's valid cache with decode_attention.
        RoPE: ``positions`` [B, L], or ``rope`` = (cos, sin) [B, 1, L, d] fp32 already gathered for them (a
        decoder computes them once for all its layers).
        The caller sets or advances the cache's lengths once every layer has run.
        """
        B, L, _ = hidden.shape
        Hq, Hkv = self.num_heads, self.num_kv_heads
        if (positions is None) == (rope is None):
            raise ValueError("ModalityAttention: give either positions [B, L] or rope (cos, sin), not both or neither")
        if rope is None:
            rope = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        if prefill is None:
            prefill = cache is None or kv_start is not None
        if not prefill and (cache is None or kv_start is not None or kv_end is not None):
            raise ValueError("ModalityAttention: decoding (prefill=False) needs a cache and attends all of it: "
                             "key ranges (kv_start, kv_end) apply to prefill only")  # fmt: skip
        heads = self._project(hidden, modality).view(B, L, Hq + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        qk = apply_rope(heads[:, : Hq + Hkv], *rope)  # q and k heads rotated in one pass
        q, k, v = qk[:, :Hq], qk[:, Hq:], heads[:, Hq + Hkv :]
        if return_stats and not prefill:
            raise ValueError("ModalityAttention: return_stats applies to prefill only")
        if cache is not None:
            cache.write(layer_index, k, v, cache.lengths[layer_index])
        stats = None
        if prefill:
            out, lse = ops.span_attention(q, k, v, kv_start, kv_end, return_lse=True)
            stats = AttentionStats(q, k, lse) if return_stats else None
        else:
            k_cache, v_cache = cache.layer(layer_index)
            out = ops.decode_attention(q, k_cache, v_cache, cache.lengths[layer_index] + L)
        out = self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, Hq * d) -> (B, L, hidden)
        return (out, stats) if return_stats else out
