"""Reference semantics of the fused decode step (fastmm.ops.decode_layer): every layer of a Llama-style decoder for
L new tokens per row (causal among them), written from the formulas over the layers' weights, not from the
decoder's modules.

Per row b and new token t, with s the residual stream (the input embedding before layer 0), m = modality[b, t]:

    h = rms_norm(s, input_norm[m])             q, k, v = split(h qkv^T + qkv_bias)
    q, k = rope(q, positions[b] + t), rope(k, ...), k and v written into the layer's cache at lengths[layer, b] + t
    a = softmax(q k^T / sqrt(d)) v over the layer's keys 0 .. lengths[layer, b] + t (GQA: Hq / Hkv q heads per kv)
    s = s + (a o^T + o_bias)                   h = rms_norm(s, post_norm[m])
    x = (silu(gate) * up) down^T + down_bias   with gate, up = split(h gate_up^T + gate_up_bias)

and the next layer starts from s + x. Math in fp32; results round to the weights' dtype where the decoder's
modules hand a tensor to the next op (each norm, projection, rotated q / k, attention output, the MLP product,
and the residual additions), so that in fp32 it equals the decoder's layer loop to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    sf = s.float()
    return (sf * torch.rsqrt(sf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()).to(s.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, d] rotated by the rows (cos, sin) [B, d] (Llama convention: i pairs with i + d/2)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """q [B, L, Hq, d], each query over the cached keys 0 .. last[b, t] of k_cache / v_cache [B, Hkv, S, d]:
    [B * L, Hq * d]."""
    B, L, Hq, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    grouped = q.float().view(B, L, Hkv, Hq // Hkv, d)
    scores = torch.einsum("blhgd,bhsd->blhgs", grouped, k_cache.float()) * d**-0.5
    visible = torch.arange(S, device=q.device)[None, None, :] <= last[:, :, None]  # [B, L, S]
    scores = scores.masked_fill(~visible[:, :, None, None, :], float("-inf"))
    out = torch.einsum("blhgs,bhsd->blhgd", scores.softmax(dim=-1), v_cache.float())
    return out.reshape(B * L, Hq * d).to(q.dtype)


def decode_layers(
    embeds: torch.Tensor,
    modality: torch.Tensor,
    layers,
    num_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step of every layer in ``layers`` (read by DecodeLayerWeights' field names).

    Args:
        embeds: [B, L, H] input embeddings in the weights' dtype; modality: [B, L] ids in [0, M).
        k_cache, v_cache: [layers, B, Hkv, S, d]; token t's k and v are written at lengths[layer, b] + t.
        lengths: [layers, B] integer cache lengths before the step.
        rope_cos, rope_sin: [P, d] fp32 tables (fastmm.nn.rope.rope_table).
        positions: [B] the RoPE position of each row's first new token.

    Returns:
        (x, residual) [B, L, H]: the last layer's MLP output and the residual stream it adds to, as the
        decoder's layer loop returns them (its final norm adds and normalizes).
    """
    B, L, H = embeds.shape
    Hkv, d = k_cache.shape[2], k_cache.shape[4]
    steps = torch.arange(L, device=embeds.device)
    ids = modality.reshape(B * L).long()
    rows = torch.arange(B, device=embeds.device)[:, None].expand(B, L)
    at = (positions.long()[:, None] + steps).reshape(B * L)
    cos, sin = rope_cos[at], rope_sin[at]  # [B L, d]
    x, residual = embeds.reshape(B * L, H), None
    for index, layer in enumerate(layers):
        s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
        heads = _linear(_rms_norm(s, layer.input_norm[ids], layer.input_norm_eps), layer.qkv, layer.qkv_bias)
        heads = heads.view(B * L, num_heads + 2 * Hkv, d)
        q, k, v = heads[:, :num_heads], heads[:, num_heads : num_heads + Hkv], heads[:, num_heads + Hkv :]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        slots = lengths[index].long()[:, None] + steps  # [B, L]
        k_cache[index][rows, :, slots] = k.view(B, L, Hkv, d)
        v_cache[index][rows, :, slots] = v.view(B, L, Hkv, d)
        attended = _attend(q.view(B, L, num_heads, d), k_cache[index], v_cache[index], slots)
        attended = _linear(attended, layer.o, layer.o_bias)
        residual = (attended.float() + s.float()).to(s.dtype)
        gate, up = _linear(_rms_norm(residual, layer.post_norm[ids], layer.post_norm_eps), layer.gate_up,
                           layer.gate_up_bias).chunk(2, dim=-1)  # fmt: skip
        x = _linear((F.silu(gate.float()) * up.float()).to(gate.dtype), layer.down, layer.down_bias)
    return x.view(B, L, H), residual.view(B, L, H)


class DecodeLayerRunner:
    """The fused step's runner interface (see fastmm.native.decode_layer) over ``decode_layers``: built once for
    (layers, cache, batch); ``run(embeds, modality) -> (x, residual)`` writes into the cache at cache.lengths,
    which the caller then advances."""

    def __init__(self, layers, num_heads: int, cache, rope_cos: torch.Tensor, rope_sin: torch.Tensor, batch: int,
                 tokens: int = 1):  # fmt: skip
        if not layers:
            raise ValueError("DecodeLayerRunner: layers must hold at least one layer, got none")
        if cache.k.shape[1] != batch:
            raise ValueError(f"DecodeLayerRunner: batch must be the cache's batch, got {batch} for cache.k of shape "
                             f"{tuple(cache.k.shape)}")  # fmt: skip
        self._layers, self._num_heads, self._cache = list(layers), num_heads, cache
        self._rope = (rope_cos, rope_sin)
        self.batch, self.tokens = batch, tokens

    def run(self, embeds: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        return decode_layers(embeds, modality, self._layers, self._num_heads, cache.k, cache.v, cache.lengths,
                             *self._rope, cache.positions)  # fmt: skip
