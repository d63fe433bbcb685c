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

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastmm import ops
from fastmm.kv_cache import KVCache
from fastmm.models.config import UnifiedConfig
from fastmm.nn.attention import AttentionStats, ModalityAttention
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

    def forward(self, x, residual, modality, cos, sin, cache, layer_index, prefill, kv_start=None, kv_end=None,
                return_stats=False):  # fmt: skip
        """One pre-norm block on the residual stream; returns (block output, residual) with the add of the
        output deferred to the next norm, where it is fused, and the attention's AttentionStats with
        ``return_stats``. Key ranges (prefill only) default to causal."""
        h, residual = norm_with_residual(self.input_norm, x, modality, residual)
        attended = self.attn(h, modality, cache=cache, layer_index=layer_index, rope=(cos, sin), prefill=prefill,
                             kv_start=kv_start, kv_end=kv_end, return_stats=return_stats)  # fmt: skip
        attended, stats = attended if return_stats else (attended, None)
        h, residual = self.post_attention_norm(attended, modality, residual)
        return (self.mlp(h), residual, stats) if return_stats else (self.mlp(h), residual)


# Prompts of at most this many rows (batch x tokens) without padding or pruning run the fused decode step (one
# native call per layer, its decode-sized GEMM kernels); longer ones run the layers' own GEMMs.
FUSED_PROMPT_ROWS = 64


class PrefillTokens(NamedTuple):
    """The prompt as a pruning policy sees it before a layer, in that layer's coordinates (after earlier pruning):
    row b's tokens are slots [0, count[b]), padding after."""

    image: torch.Tensor  # [B, L] bool: the image tokens still present
    count: torch.Tensor  # [B] tokens per row
    kv_start: torch.Tensor  # [B, L] int32 key ranges the layer's attention runs with
    kv_end: torch.Tensor


class PrunePolicy(Protocol):
    """What Decoder.prefill asks a pruning policy (fastmm.runtime.prune has VTW, FastV and PyramidDrop)."""

    def check(self, num_layers: int) -> None:
        """Raise ValueError if the policy's layers do not fit a decoder of num_layers layers."""

    def needs_stats(self, layer_index: int) -> bool:
        """Whether keep_images before layer_index + 1 reads the attention statistics of layer_index."""

    def keep_images(self, layer_index: int, tokens: PrefillTokens, stats: AttentionStats | None) -> torch.Tensor | None:
        """Before layer layer_index: None (no pruning here), or [B, L] bool, True for the image tokens that stay
        (text and padding are the decoder's to keep). stats: the previous layer's, where needs_stats said so."""


class Prefilled(NamedTuple):
    hidden: torch.Tensor  # [B, L', hidden] final-normed hidden states of the tokens that reached the last layer
    last: torch.Tensor  # [B, hidden] each row's last token (the one that predicts the next)
    count: torch.Tensor  # [B] tokens per row in hidden (L' >= every count)


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
            embeds: [B, L, hidden] input embeddings; token t of row b takes RoPE position cache.positions[b] + t
                and each layer's cache slot cache.lengths[layer, b] + t.
            modality: [B, L] int64 modality ids (zeros unless modality_adaptive).
            cache: the static KV cache (lengths on the device: nothing here syncs the host).
            prefill: True for a prompt into an empty cache (causal span_attention; ``prefill`` takes padding and
                pruning), False for decode steps.

        Returns:
            [B, L, hidden] final-normed hidden states.
        """
        if prefill:
            return self.prefill(embeds, modality, cache).hidden
        L = embeds.shape[1]
        runner = self._fused_decode_runner(embeds, cache, prefill)
        if runner is not None:
            x, residual = runner.run(embeds, modality)
        else:
            positions = cache.positions.long()[:, None] + torch.arange(L, device=embeds.device)  # (B, L)
            cos, sin = self._rope(positions)
            x, residual = embeds, None
            for index, layer in enumerate(self.layers):
                x, residual = layer(x, residual, modality, cos, sin, cache, index, prefill)
        cache.advance(L)
        return self.norm(x, modality, residual)[0]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, 1, L, d] fp32 for positions [B, L]."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def prefill(
        self,
        embeds: torch.Tensor,
        modality: torch.Tensor,
        cache: KVCache,
        lengths: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        prune: PrunePolicy | None = None,
    ) -> Prefilled:
        """Run prompts through the decoder into an empty cache, causal, optionally dropping image tokens on the way.

        Args:
            embeds: [B, L, hidden]; row b's prompt is its first lengths[b] tokens (right padding).
            modality: [B, L] int64 modality ids.
            cache: an empty KV cache; afterwards layer i holds the tokens that reached layer i (cache.lengths[i])
                and cache.positions the prompt lengths, so decoding continues at the right RoPE positions.
            lengths: [B] prompt lengths in [1, L] (None: every row has L tokens).
            image_mask: [B, L] bool, the image tokens (what a policy may drop); None: none.
            prune: a pruning policy (fastmm.runtime.prune). Before each layer it may drop image tokens: the
                survivors move together (ops.compact_tokens) with their positions, modality and key ranges,
                so later layers compute exactly what an unpruned decoder computes on the shorter prompt.
                Each pruning point reads the largest survivor count on the host (one sync) to size its buffer.

        Short prompts without padding or pruning (B L <= FUSED_PROMPT_ROWS) run the fused decode step where it
        runs (fastmm.ops.decode_layer: one native call per layer on CPU), the rest the layers.

        Returns:
            Prefilled(hidden, last, count).
        """
        B, L, _ = embeds.shape
        device = embeds.device
        slots = torch.arange(L, device=device)
        unpadded = lengths is None
        if lengths is None:
            lengths = torch.full((B,), L, dtype=torch.int64, device=device)
        elif lengths.shape != (B,) or lengths.dtype.is_floating_point:
            raise ValueError(f"Decoder.prefill: lengths must be [B] = ({B},) integers, got {lengths.dtype} "
                             f"shape {tuple(lengths.shape)}")  # fmt: skip
        elif lengths.device.type == "cpu" and (int(lengths.min()) < 1 or int(lengths.max()) > L):
            raise ValueError(f"Decoder.prefill: lengths must be in [1, L = {L}], got values in "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")  # fmt: skip
        lengths = lengths.to(device)
        valid = slots[None, :] < lengths[:, None]
        if image_mask is None:
            image = torch.zeros(B, L, dtype=torch.bool, device=device)
        elif image_mask.shape != (B, L) or image_mask.dtype != torch.bool:
            raise ValueError(f"Decoder.prefill: image_mask must be [B, L] = ({B}, {L}) bool, got {image_mask.dtype} "
                             f"shape {tuple(image_mask.shape)}")  # fmt: skip
        else:
            image = image_mask.to(device) & valid
        if prune is not None:
            prune.check(len(self.layers))
        self.decode_runners.drop(cache)  # a new sequence in this cache: its runner may predate new weights
        if prune is None and unpadded and B * L <= FUSED_PROMPT_ROWS:
            # A short prompt into an empty cache is a decode step of L tokens: causal over themselves.
            runner = self._fused_decode_runner(embeds, cache, False)
            if runner is not None:
                x, residual = runner.run(embeds, modality)
                cache.advance(L)
                hidden = self.norm(x, modality, residual)[0]
                return Prefilled(hidden, hidden[:, -1], lengths)
        positions = cache.positions.long()[:, None] + slots  # (B, L)
        kv_start = torch.zeros(B, L, dtype=torch.int32, device=device)
        kv_end = torch.where(valid, slots + 1, 0).int()  # causal; padding attends nothing
        count, x, residual, stats = lengths, embeds, None, None
        cos, sin = self._rope(positions)
        for index, layer in enumerate(self.layers):
            keep_images = None if prune is None else prune.keep_images(index, PrefillTokens(image, count, kv_start, kv_end), stats)  # fmt: skip
            if keep_images is not None:
                present = slots[None, :] < count[:, None]
                keep = present & (~image | keep_images)
                packed = ops.compact_tokens(x, positions, keep, int(keep.sum(dim=1).max()))
                at = packed.source.clamp(min=0)
                x, positions, count = packed.hidden, packed.positions, packed.count.long()
                residual = None if residual is None else residual.gather(1, at[..., None].expand(-1, -1, residual.shape[-1]))
                modality = modality.gather(1, at)
                image = image.gather(1, at) & (packed.source >= 0)
                kv_start, kv_end = ops.compact_key_ranges(kv_start, kv_end, keep, packed.source)
                slots = torch.arange(x.shape[1], device=device)
                cos, sin = self._rope(positions)
            want_stats = prune is not None and prune.needs_stats(index)
            out = layer(x, residual, modality, cos, sin, cache, index, True, kv_start, kv_end, return_stats=want_stats)
            x, residual, stats = out if want_stats else (*out, None)
            cache.lengths[index] = count
        cache.positions.add_(lengths.to(cache.positions.dtype))
        hidden = self.norm(x, modality, residual)[0]
        last = hidden[torch.arange(B, device=device), count - 1]
        return Prefilled(hidden, last, count)

    def _fused_decode_runner(self, embeds: torch.Tensor, cache: KVCache, prefill: bool):
        """The runner of fastmm.ops.decode_layer's fused step for this step (built once per cache and batch), or
        None where the layers run in Python: prefill, and whatever ops.decode_layer.fused_decode_runs refuses
        (autograd, torch.compile, a backend without the fused step), RoPE tables that are
        not fp32, and modality-adaptive models (routed k / v projections)."""
        if prefill:  # prefill drops the cache's runner itself
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
