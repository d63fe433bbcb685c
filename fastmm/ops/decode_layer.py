"""The fused decode step: every layer of a Llama-style decoder for the new tokens of each row (one, or a
speculative decoding window), one call per layer.

A decode step through separate ops pays validation, launch and allocation about 18 times per layer; on the CPU
that costs about as much as the weight GEMMs at the 8 x 512 benchmark model. The fused step pays them once per
(weights, KV cache, batch): a runner checks every weight, the cache and the RoPE tables when it is built and a
step checks in O(1) only what changes between steps.

Spec: fastmm.reference.decode_layer (the formulas over the layers' weights; tests hold it to the decoder's own
Python layer loop, fastmm.models.decoder). Backends: reference, native (C++, CPU, float32 / bfloat16 / float16:
fastmm.native.decode_layer); each module of the family has a ``DecodeLayerRunner``, picked by the normal backend
choice. Triton has none: there, and wherever the fused step does not run, ``DecodeRunners.get`` returns None and
the caller runs its layer loop, op by op (what CUDA graphs capture). It never runs while torch.compile traces
(the loop is what it traces) or with autograd on.

The weights cross as ``DecodeLayerWeights``, one per layer, so the backend reads no model's attribute names.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Sequence

import torch

from fastmm._validate import FLOAT_DTYPES
from fastmm.kv_cache import KVCache
from fastmm.ops._dispatch import implementation

@dataclasses.dataclass(frozen=True)
class DecodeLayerWeights:
    """One decoder layer's parameters as the fused step reads them (H hidden, M modalities, Hq / Hkv heads of
    size d, I the MLP width); every tensor in the decoder's dtype, biases optional."""

    name: str  # how errors name the layer, e.g. "layers[3]"
    input_norm: torch.Tensor  # [M, H] RMSNorm weight per modality
    input_norm_eps: float
    qkv: torch.Tensor  # [(Hq + 2 Hkv) d, H] q, k, v projections stacked
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [H, Hq d]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [M, H]
    post_norm_eps: float
    gate_up: torch.Tensor  # [2 I, H] gate rows then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None


def _runner_type(device: torch.device):
    return implementation("decode_layer", "decode_layer", "DecodeLayerRunner", device)


def fused_decode_runs(embeds: torch.Tensor) -> bool:
    """Whether the fused step runs a decode step with these input embeddings [B, L, H] (L new tokens per row: one,
    or a speculative window): no autograd, no torch.compile tracing, a dtype and device whose backend has the fused
    step (reference, native)."""
    return (
        not torch.compiler.is_compiling()
        and embeds.dtype in FLOAT_DTYPES
        and not torch.is_grad_enabled()
        and _runner_type(embeds.device) is not None
    )


class DecodeRunners:
    """A model's fused-step runners by KVCache: built on a cache's first fused step, dropped with the cache or on
    request (a prefill that starts a new sequence in a cache drops its runner, so a runner never spans a change of
    weights between sequences). Copies and pickles start empty: a runner's pointers belong to the tensors of the
    model it was built for."""

    def __init__(self):
        self._by_cache: weakref.WeakKeyDictionary[KVCache, object] = weakref.WeakKeyDictionary()

    def __reduce__(self):
        return DecodeRunners, ()

    def __len__(self) -> int:
        return len(self._by_cache)

    def get(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        layers: Callable[[], Sequence[DecodeLayerWeights]],
        num_heads: int,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ):
        """The runner of ``cache`` for a step on ``embeds`` [B, L, H] (``run(embeds, modality) -> (x, residual)``),
        or None where the fused step does not run (fused_decode_runs). ``layers`` is called only to build one."""
        if not fused_decode_runs(embeds):
            return None
        batch, tokens = embeds.shape[:2]
        runner = self._by_cache.get(cache)
        runner_type = _runner_type(embeds.device)
        # A backend switch builds the new backend's runner; a new batch or window size, one of that shape.
        if type(runner) is not runner_type or runner.batch != batch or runner.tokens != tokens:
            runner = self._by_cache[cache] = runner_type(layers(), num_heads, cache, rope_cos, rope_sin, batch, tokens)
        return runner

    def drop(self, cache: KVCache) -> None:
        self._by_cache.pop(cache, None)
