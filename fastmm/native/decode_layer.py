"""Native (C++ / CPU) fused decode step (fastmm.ops.decode_layer): one fastmm._C.decode_layer call per layer
(csrc/decode_layer.cpp).

A DecodeLayerRunner is built once for one (layer weights, KVCache, batch): its constructor checks every weight,
the cache and the RoPE tables and allocates the scratch and output buffers; a step then checks in O(1) only
what can change between steps (the input, the modality ids, the cache lengths) and makes one call per layer. It
runs in the weights' dtype (float32, bfloat16 or float16), rounding where the Python layers round.

A runner holds the tensors its pointers point into, so they stay valid as long as it lives;
fastmm.ops.decode_layer.DecodeRunners keeps one per live KVCache. The layers arrive as
fastmm.ops.decode_layer.DecodeLayerWeights (read by field name here: this module imports no op or model).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastmm import _C
from fastmm.kv_cache import KVCache
from fastmm.native._shared import DTYPE_CODE, ptr, threads_for


def _check(
    name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, optional: bool = False
) -> torch.Tensor | None:
    """t, detached, if it is a contiguous CPU tensor of this shape and dtype (or None where optional)."""
    if t is None and optional:
        return None
    if (not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous()
            or tuple(t.shape) != shape or t.dtype != dtype):  # fmt: skip
        got = "None" if t is None else f"{t.dtype} shape {tuple(t.shape)} strides {t.stride()} on {t.device}"
        raise ValueError(f"DecodeLayerRunner: {name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {got}")
    return t.detach()


def _layer_weights(layer, widths: dict[str, int], dtype: torch.dtype) -> tuple[list[torch.Tensor], tuple]:
    """(the tensors of one DecodeLayerWeights, checked to be ``dtype`` and detached; decode_layer's weight
    arguments: their pointers, each norm's eps after its weight, 0 for an absent bias)."""
    H, I, M, q_width, kv_width = (widths[key] for key in ("H", "I", "M", "q_width", "kv_width"))
    qkv_width = q_width + 2 * kv_width

    def check(field: str, shape: tuple[int, ...], optional: bool = False) -> torch.Tensor | None:
        return _check(f"{layer.name}.{field}", getattr(layer, field), shape, dtype, optional)

    input_norm, qkv, qkv_bias = check("input_norm", (M, H)), check("qkv", (qkv_width, H)), check("qkv_bias", (qkv_width,), True)
    o, o_bias, post_norm = check("o", (H, q_width)), check("o_bias", (H,), True), check("post_norm", (M, H))
    gate_up, gate_up_bias = check("gate_up", (2 * I, H)), check("gate_up_bias", (2 * I,), True)
    down, down_bias = check("down", (H, I)), check("down_bias", (H,), True)
    tensors = [input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, gate_up_bias, down, down_bias]
    args = (ptr(input_norm), float(layer.input_norm_eps), ptr(qkv), ptr(qkv_bias), ptr(o), ptr(o_bias),
            ptr(post_norm), float(layer.post_norm_eps), ptr(gate_up), ptr(gate_up_bias), ptr(down),
            ptr(down_bias))  # fmt: skip
    return [t for t in tensors if t is not None], args


class DecodeLayerRunner:
    """Runs every layer of ``layers`` (DecodeLayerWeights, in order) for a decode step of ``batch`` rows of
    ``tokens`` new tokens each (one, or a window of speculative decoding, causal among them) into ``cache``:
    ``run(embeds, modality) -> (x, residual)``, what the decoder's layer loop returns.
    Its dtype is the first layer's q/k/v weight's: every weight and the cache must have it; the RoPE tables
    [positions, d] are float32."""

    def __init__(self, layers: Sequence, num_heads: int, cache: KVCache, rope_cos: torch.Tensor,
                 rope_sin: torch.Tensor, batch: int, tokens: int = 1):  # fmt: skip
        if not layers:
            raise ValueError("DecodeLayerRunner: layers must hold at least one layer, got none")
        dtype = layers[0].qkv.dtype
        if dtype not in DTYPE_CODE:
            raise ValueError(f"DecodeLayerRunner: the weights' dtype must be float32, bfloat16 or float16, got {dtype}")
        M, H = layers[0].input_norm.shape
        I = layers[0].down.shape[1]
        if cache.k.dim() != 5 or cache.k.shape[1] != batch:
            raise ValueError(f"DecodeLayerRunner: batch must be the cache's batch, got {batch} for cache.k of shape "
                             f"{tuple(cache.k.shape)}")  # fmt: skip
        Hq, Hkv, S, d = num_heads, cache.k.shape[2], cache.k.shape[3], cache.k.shape[4]
        cache_shape = (len(layers), batch, Hkv, S, d)
        positions = rope_cos.shape[0]
        if S > positions:  # every position written is below S, hence a row of the tables
            raise ValueError(f"DecodeLayerRunner: cache.max_len {S} exceeds the RoPE tables' {positions} positions")
        # Every tensor a pointer points into, kept so that the pointers stay valid while the runner lives.
        self._k = _check("cache.k", cache.k, cache_shape, dtype)
        self._v = _check("cache.v", cache.v, cache_shape, dtype)
        self._lengths = _check("cache.lengths", cache.lengths, (len(layers), batch), torch.int32)
        self._positions = _check("cache.positions", cache.positions, (batch,), torch.int32)
        self._rope = (_check("rope_cos", rope_cos, (positions, d)), _check("rope_sin", rope_sin, (positions, d)))
        widths = {"H": H, "I": I, "M": M, "q_width": Hq * d, "kv_width": Hkv * d}
        self._weights, weight_args = [], []
        for layer in layers:
            tensors, args = _layer_weights(layer, widths, dtype)
            self._weights.append(tensors)
            weight_args.append(args)
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"DecodeLayerRunner: tokens must be an int >= 1, got {tokens!r}")
        sizes = (batch, tokens, H, Hq, Hkv, d, I, S)
        code = DTYPE_CODE[dtype]
        # Bytes; torch's CPU allocator aligns to 64 bytes, as decode_layer requires.
        self._scratch = torch.empty(_C.decode_layer_scratch_size(*sizes, code), dtype=torch.uint8)
        self._x = torch.empty(batch, tokens, H, dtype=dtype)  # each layer's output in turn
        self._residual = torch.empty(batch, tokens, H, dtype=dtype)  # the residual stream, updated in place

        self.batch, self.tokens, self.num_modalities, self.max_len, self.dtype = batch, tokens, M, S, dtype
        self.embeds_shape = (batch, tokens, H)
        self._attention_work = batch * tokens * Hq * S * d  # what decode_attention's launcher picks its threads by
        # decode_layer's arguments between (x, residual, modality) and the thread counts, one tuple per layer: each
        # layer writes and attends its own cache length (a pruned prefill leaves later layers shorter).
        outputs = (self._x.data_ptr(), self._residual.data_ptr())
        rope_and_scratch = (*(t.data_ptr() for t in self._rope), self._scratch.data_ptr(), self._scratch.numel())
        self._layer_args = [
            (self._positions.data_ptr(), self._lengths[i].data_ptr(), *outputs, self._k[i].data_ptr(),
             self._v[i].data_ptr(), *rope_and_scratch, *weights, *sizes, code)
            for i, weights in enumerate(weight_args)
        ]
        self._rope_positions = positions
        self._out_ptrs = (self._x.data_ptr(), self._residual.data_ptr())

    def run(self, embeds: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer for L new tokens per row at RoPE positions cache.positions + t, their k and v written into
        each layer's cache at cache.lengths[layer] + t (which the caller then advances).

        Args:
            embeds: [B, L, H] CPU input embeddings in the runner's dtype.
            modality: [B, L] int64 modality ids in [0, M).

        Returns:
            (x, residual), both [B, L, H]: the last layer's output and the residual stream, to be added and
            normed by the final norm. They are the runner's buffers, overwritten by the next run.
        """
        x, ids = self._checked_inputs(embeds, modality)
        L = self.tokens
        lo, hi = (int(bound) for bound in torch.aminmax(self._lengths))
        if lo < 0 or hi > self.max_len - L:
            raise ValueError(f"DecodeLayerRunner.run: the cache is full or corrupt: lengths must be in "
                             f"[0, max_len - {L} = {self.max_len - L}] before a decode step of {L} tokens, got "
                             f"[{lo}, {hi}]")  # fmt: skip
        lo, hi = (int(bound) for bound in torch.aminmax(self._positions))
        if lo < 0 or hi > self._rope_positions - L:
            raise ValueError(f"DecodeLayerRunner.run: cache.positions must be in [0, {self._rope_positions - L}] (the "
                             f"RoPE tables' rows) before a decode step of {L} tokens, got [{lo}, {hi}]")  # fmt: skip
        threads, attention_threads = torch.get_num_threads(), threads_for(self._attention_work)
        x_ptr, residual_ptr, ids_ptr = x.data_ptr(), 0, ids.data_ptr()  # layer 0: no residual yet
        for args in self._layer_args:
            if torch._C._autograd._profiler_enabled():  # named in torch.profiler traces (fastmm profile --trace)
                with torch.profiler.record_function("fastmm::decode_layer"):
                    _C.decode_layer(x_ptr, residual_ptr, ids_ptr, *args, threads, attention_threads)
            else:
                _C.decode_layer(x_ptr, residual_ptr, ids_ptr, *args, threads, attention_threads)
            x_ptr, residual_ptr = self._out_ptrs  # the next layer reads and overwrites them in place
        return self._x, self._residual

    def _checked_inputs(self, embeds: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds contiguous, modality as [B] contiguous ids), after checking their shapes, dtypes and ids."""
        B, L = self.batch, self.tokens
        x = embeds.contiguous()
        if x.shape != self.embeds_shape or x.dtype != self.dtype or not x.is_cpu:
            raise ValueError(f"DecodeLayerRunner.run: embeds must be a CPU {self.dtype} tensor of shape {self.embeds_shape}, "
                             f"got {x.dtype} shape {tuple(x.shape)} on {x.device}")  # fmt: skip
        if modality.shape != (B, L) or modality.dtype != torch.int64 or not modality.is_cpu:
            raise ValueError(f"DecodeLayerRunner.run: modality must be a CPU int64 tensor of shape ({B}, {L}), got "
                             f"{modality.dtype} shape {tuple(modality.shape)} on {modality.device}")  # fmt: skip
        ids = modality.reshape(B * L).contiguous()
        lo, hi = (int(bound) for bound in torch.aminmax(ids))
        if lo < 0 or hi >= self.num_modalities:
            raise ValueError(f"DecodeLayerRunner.run: modality ids must be in [0, {self.num_modalities}), "
                             f"got values in [{lo}, {hi}]")  # fmt: skip
        return x, ids
