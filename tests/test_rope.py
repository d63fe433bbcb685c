"""fastmm.nn.rope, the one RoPE, against independent formulations: transformers' Llama rotary embedding and
apply_rotary_pos_emb (bit for bit in fp32), and an fp64 rotation of complex pairs."""

from __future__ import annotations

import pytest
import torch

from fastmm.nn.rope import apply_rope, rope_cos_sin, rope_table

T = pytest.importorskip("transformers")


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0), (128, 10000.0)])
def test_tables_are_transformers_llama_rope_bit_for_bit(head_dim, theta):
    config = T.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta, max_position_embeddings=64)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    rotary = T.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 5, 63], [7, 7, 30, 2]])
    expected_cos, expected_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_table(64, head_dim, theta)
    assert torch.equal(cos[positions], expected_cos) and torch.equal(sin[positions], expected_sin)
    gathered = rope_cos_sin(positions, head_dim, theta)
    assert torch.equal(gathered[0][:, 0], expected_cos) and torch.equal(gathered[1][:, 0], expected_sin)

    q = torch.randn(2, 3, 4, head_dim)
    expected_q, _ = T.models.llama.modeling_llama.apply_rotary_pos_emb(q, q, expected_cos, expected_sin)
    torch.testing.assert_close(apply_rope(q, *gathered), expected_q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_apply_rope_is_a_rotation_of_pairs(dtype):
    """Dimension i and i + d/2 form the complex number x_i + i x_{i + d/2}, multiplied by e^{i angle}."""
    head_dim, theta = 32, 10000.0
    positions = torch.arange(9)[None].expand(2, 9)
    x = torch.randn(2, 3, 9, head_dim).to(dtype)
    got = apply_rope(x, *rope_cos_sin(positions, head_dim, theta))
    half = head_dim // 2
    frequencies = theta ** -(torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = positions.double()[:, None, :, None] * frequencies
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([pairs.real, pairs.imag], dim=-1)
    assert got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * 4)
