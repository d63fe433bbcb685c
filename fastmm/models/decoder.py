"""The Llama-style decoder of the unified model: RMSNorm (modality_rms_norm), RoPE, GQA attention
(fastmm.nn.ModalityAttention: span_attention for a prompt, decode_attention against the static KV cache), SwiGLU
MLP.

q, k, v come from one fused projection and gate / up from another: one GEMM where Llama runs three (two),
which matters at decode batch sizes, where every GEMM streams its weights for a handful of rows. With
``modality_adaptive`` (mPLUG-Owl2) the norms hold one weight per modality and k / v are a routed projection
(ModalityAttention's ``modality_kv``).

The layers below are the reference and what torch.compile and CUDA graphs capture. An eager decode step runs
the fused step of fastmm.ops.decode_layer instead where its backend has one (CPU, fp32 / bf16 / fp16: each
layer one C++ call), without the per-op overhead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmm.kv_cache import KVCache
from fastmm.models.config import UnifiedConfig
from fastmm.nn.attention import ModalityAttention
from fastmm.nn.linear import Linear
from fastmm.nn.norm import ModalityRMSNorm
from fastmm.nn.rope import rope_table
from fastmm.ops.decode_layer import DecodeLayerWeights, DecodeRunners


def norm_with_residual(
    norm: ModalityRMSNorm, x: torch.Tensor, modality: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), the add fused into the norm; the first block has no residual yet."""
    if residual is None:
        return norm(x, modality), x
    return norm(x, modality, residual)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one GEMM."""

    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.input_norm = ModalityRMSNorm(config.num_modalities, config.hidden_size, config.rms_norm_eps)
        self.attn = ModalityAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.num_modalities,
            modality_kv=config.modality_adaptive, rope_theta=config.rope_theta, bias=config.attention_bias,
        )  # fmt: skip
        self.post_attention_norm = ModalityRMSNorm(config.num_modalities, config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, modality, cos, sin, cache, layer_index, prefill):
        """One pre-norm block on the residual stream; returns (block output, residual) with the add of the
        output deferred to the next norm, where it is fused."""
        h, residual = norm_with_residual(self.input_norm, x, modality, residual)
        attended = self.attn(h, modality, cache=cache, layer_index=layer_index, rope=(cos, sin), prefill=prefill)
        h, residual = self.post_attention_norm(attended, modality, residual)
        return self.mlp(h), residual


class Decoder(nn.Module):
    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = ModalityRMSNorm(config.num_modalities, config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_table(config.max_position_embeddings, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.decode_runners = DecodeRunners()  # the fused decode step's runners, one per KV cache

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A static KV cache for ``batch`` rows of up to ``max_len`` tokens, in the weights' dtype and device."""
        weight = self.embed_tokens.weight
        config = self.config
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"Decoder.new_cache: max_len {max_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        return KVCache(config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim,
                       dtype or weight.dtype, weight.device)  # fmt: skip

    def forward(self, embeds: torch.Tensor, modality: torch.Tensor, cache: KVCache, prefill: bool) -> torch.Tensor:
        """Run L new tokens of every row through the decoder and advance the cache by L.

        Args:
            embeds: [B, L, hidden] input embeddings; token t of row b sits at position cache.lengths[b] + t.
            modality: [B, L] int64 modality ids (zeros unless modality_adaptive).
            cache: the static KV cache (lengths on the device: nothing here syncs the host).
            prefill: True for a prompt into an empty cache (causal span_attention), False for decode steps.

        Returns:
            [B, L, hidden] final-normed hidden states.
        """
        L = embeds.shape[1]
        runner = self._fused_decode_runner(embeds, cache, prefill)
        if runner is not None:
            x, residual = runner.run(embeds, modality)
        else:
            positions = cache.lengths.long()[:, None] + torch.arange(L, device=embeds.device)  # (B, L)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, L, d) fp32
            x, residual = embeds, None
            for index, layer in enumerate(self.layers):
                x, residual = layer(x, residual, modality, cos, sin, cache, index, prefill)
        cache.advance(L)
        return self.norm(x, modality, residual)[0]

    def _fused_decode_runner(self, embeds: torch.Tensor, cache: KVCache, prefill: bool):
        """The runner of fastmm.ops.decode_layer's fused step for this step (built once per cache and batch), or
        None where the layers run in Python: prefill, and whatever ops.decode_layer.fused_decode_runs refuses
        (several tokens per row, autograd, torch.compile, a backend without the fused step), RoPE tables that are
        not fp32, and modality-adaptive models (routed k / v projections)."""
        if prefill:  # a new sequence in this cache: its runner may predate new weights
            self.decode_runners.drop(cache)
            return None
        if self.rope_cos.dtype != torch.float32 or self.config.modality_adaptive:  # the Python path copes
            return None
        return self.decode_runners.get(embeds, cache, self.decode_layer_weights, self.config.num_heads,
                                       self.rope_cos, self.rope_sin)  # fmt: skip

    def decode_layer_weights(self) -> list[DecodeLayerWeights]:
        """Every layer's parameters as fastmm.ops.decode_layer reads them (detached views, no copies)."""
        if self.config.modality_adaptive:
            raise ValueError("Decoder.decode_layer_weights: a modality_adaptive decoder has a routed kv_proj, which "
                             "the fused decode step does not run")  # fmt: skip

        def bias(linear) -> torch.Tensor | None:
            return None if linear.bias is None else linear.bias.detach()

        return [
            DecodeLayerWeights(
                name=f"layers[{index}]",
                input_norm=layer.input_norm.weight.detach(), input_norm_eps=float(layer.input_norm.eps),
                qkv=layer.attn.qkv_proj.weight.detach(), qkv_bias=bias(layer.attn.qkv_proj),
                o=layer.attn.o_proj.weight.detach(), o_bias=bias(layer.attn.o_proj),
                post_norm=layer.post_attention_norm.weight.detach(), post_norm_eps=float(layer.post_attention_norm.eps),
                gate_up=layer.mlp.gate_up_proj.weight.detach(), gate_up_bias=bias(layer.mlp.gate_up_proj),
                down=layer.mlp.down_proj.weight.detach(), down_bias=bias(layer.mlp.down_proj),
            )  # fmt: skip
            for index, layer in enumerate(self.layers)
        ]
