"""ModalityAttention, the static KVCache, and transformers' attention interface on fastmm attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases

import fastmm
from fastmm.nn import ModalityAttention
from fastmm.nn.rope import apply_rope, rope_cos_sin
from fastmm.reference import attention as ref
from fastmm.runtime import KVCache


def _block(seed=0):
    torch.manual_seed(seed)
    return ModalityAttention(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16).eval()


def _by_hand(block, hidden, modality, positions, kv_start, kv_end):
    """The same block from torch ops: shared Q, per-modality K / V, Llama RoPE, dense masked attention."""
    B, L, _ = hidden.shape

    def routed(linear):
        weight = linear.weight[modality]  # (B, L, N, K)
        return torch.einsum("blnk,blk->bln", weight, hidden)

    def heads(x, n):
        return x.view(B, L, n, 16).transpose(1, 2)

    cos, sin = rope_cos_sin(positions, 16, block.rope_theta)
    q = apply_rope(heads(F.linear(hidden, block.q_proj.weight), 4), cos, sin)
    k_rows, v_rows = routed(block.kv_proj).split(32, dim=-1)  # kv_proj holds the k rows, then the v rows
    k = apply_rope(heads(k_rows, 2), cos, sin)
    v = heads(v_rows, 2)
    out = ref.span_attention(q, k, v, kv_start, kv_end)
    return F.linear(out.transpose(1, 2).reshape(B, L, 64), block.o_proj.weight)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_modality_attention_prefill_matches_torch(backend, device):
    block = _block().to(device)
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]] * 2, device=device)
    hidden = torch.randn(2, 10, 64, device=device)
    positions = torch.arange(10, device=device).expand(2, 10)
    kv_start, kv_end = fastmm.ops.key_ranges(modality=modality)
    with torch.no_grad(), fastmm.use_backend(backend):
        out = block(hidden, modality, positions, kv_start, kv_end)
        expected = _by_hand(block, hidden, modality, positions, kv_start, kv_end)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_modality_attention_decode_equals_prefill(backend, device):
    """Prefill 6 tokens into a cache, then decode 4 one at a time: each equals the matching row of one causal
    prefill over all 10 tokens."""
    block = _block(1).to(device)
    L, prompt = 10, 6
    hidden = torch.randn(1, L, 64, device=device)
    modality = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 1, 1]], device=device)
    positions = torch.arange(L, device=device)[None]
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=2, max_len=16, head_dim=16, device=device)
    with torch.no_grad(), fastmm.use_backend(backend):
        full = block(hidden, modality, positions)
        outs = [block(hidden[:, :prompt], modality[:, :prompt], positions[:, :prompt], cache=cache)]
        cache.advance(prompt)
        for t in range(prompt, L):
            outs.append(block(hidden[:, t : t + 1], modality[:, t : t + 1], positions[:, t : t + 1], cache=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [[L]] and cache.positions.tolist() == [L]


def test_shared_kv_config_is_the_routed_one_with_equal_weights():
    """modality_kv=False (one qkv GEMM, the unified decoder's layout) computes what modality_kv=True computes when
    every modality has the same k / v weights; rope=(cos, sin) given directly equals positions."""
    routed = _block(2)
    with torch.no_grad():
        routed.kv_proj.weight[1] = routed.kv_proj.weight[0]
    shared = ModalityAttention(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, modality_kv=False).eval()
    with torch.no_grad():
        shared.qkv_proj.weight.copy_(torch.cat([routed.q_proj.weight, routed.kv_proj.weight[0]]))
        shared.o_proj.weight.copy_(routed.o_proj.weight)
    assert not hasattr(shared, "kv_proj") and not hasattr(routed, "qkv_proj")
    hidden = torch.randn(2, 7, 64)
    modality = torch.tensor([[0, 1, 1, 0, 1, 0, 0]] * 2)
    positions = torch.arange(3, 10).expand(2, 7)
    with torch.no_grad():
        expected = routed(hidden, modality, positions)
        got = shared(hidden, modality, rope=rope_cos_sin(positions, 16, shared.rope_theta))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_modality_attention_refuses_what_it_would_ignore():
    block = _block()
    hidden, modality = torch.randn(1, 3, 64), torch.zeros(1, 3, dtype=torch.long)
    positions = torch.arange(3)[None]
    with pytest.raises(ValueError, match="positions"):
        block(hidden, modality)
    with pytest.raises(ValueError, match="not both"):
        block(hidden, modality, positions, rope=rope_cos_sin(positions, 16, block.rope_theta))
    with pytest.raises(ValueError, match="needs a cache"):
        block(hidden, modality, positions, prefill=False)
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=2, max_len=8, head_dim=16)
    kv_start, kv_end = fastmm.ops.key_ranges(modality=modality)
    with pytest.raises(ValueError, match="prefill only"):
        block(hidden, modality, positions, kv_start, kv_end, cache=cache, prefill=False)


def test_kv_cache_writes_rows_at_their_own_positions():
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=1, max_len=8, head_dim=3)
    k = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    cache.write(1, k, -k, torch.tensor([0, 5]))
    assert torch.equal(cache.k[1, 0, :, 0:2], k[0]) and torch.equal(cache.k[1, 1, :, 5:7], k[1])
    assert torch.equal(cache.v[1, 1, :, 5:7], -k[1]) and cache.k[0].eq(0).all()
    with pytest.raises(ValueError, match="max_len 8"):
        cache.write(0, k, k, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"\(B, Hkv, d\) = \(2, 1, 3\)"):
        cache.write(0, k[..., :2], k[..., :2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(1, 1, 1, 0, 4)
