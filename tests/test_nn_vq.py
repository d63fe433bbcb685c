"""fastmm.nn.VQCodebook: a drop-in for transformers' Chameleon, Janus and Emu3 vector quantizers, built
offline from tiny random configs; same indices, quantized values, loss and gradients as the module."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases

import fastmm
from fastmm.nn import VQCodebook

transformers = pytest.importorskip("transformers")
from transformers import ChameleonVQVAEConfig, Emu3VQVAEConfig  # noqa: E402
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEVectorQuantizer  # noqa: E402
from transformers.models.emu3.modeling_emu3 import Emu3VQVAEVectorQuantizer  # noqa: E402
from transformers.models.janus.configuration_janus import JanusVQVAEConfig  # noqa: E402
from transformers.models.janus.modeling_janus import JanusVQVAEVectorQuantizer  # noqa: E402

# Codes drawn far apart relative to rounding, so transformers' expanded formula and fastmm agree exactly.
HF_QUANTIZERS = {
    "chameleon": lambda: ChameleonVQVAEVectorQuantizer(ChameleonVQVAEConfig(embed_dim=32, num_embeddings=300)),
    "janus": lambda: JanusVQVAEVectorQuantizer(JanusVQVAEConfig(embed_dim=8, num_embeddings=257)),
}


def _spread(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        module.embedding.weight.normal_()
    return module


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("name", list(HF_QUANTIZERS))
def test_from_hf_matches_image_quantizers(backend, device, name):
    hf = _spread(HF_QUANTIZERS[name](), 0).to(device)
    codebook = VQCodebook.from_hf(hf)
    assert codebook.weight is hf.embedding.weight and codebook.beta == hf.beta
    z = torch.randn(2, hf.embedding_dim, 5, 7, device=device)
    z_hf, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
    quantized_hf, loss_hf, indices_hf = hf(z_hf)
    with fastmm.use_backend(backend):
        quantized, loss, indices = codebook(z_ours)
    torch.testing.assert_close(indices.reshape(-1), indices_hf)
    torch.testing.assert_close(quantized, quantized_hf)
    torch.testing.assert_close(loss, loss_hf)
    grad_hf = torch.autograd.grad(quantized_hf.square().sum() + loss_hf, [z_hf, hf.embedding.weight])
    grad = torch.autograd.grad(quantized.square().sum() + loss, [z_ours, codebook.weight])
    torch.testing.assert_close(grad, grad_hf)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_from_hf_matches_emu3_video_quantizer(backend, device):
    hf = _spread(Emu3VQVAEVectorQuantizer(Emu3VQVAEConfig(embed_dim=4, codebook_size=500)), 1).to(device)
    codebook = VQCodebook.from_hf(hf)
    z = torch.randn(2, 3, 4, 5, 6, device=device)  # (B, T, D, H, W)
    with fastmm.use_backend(backend):
        indices, quantized = codebook.quantize(z)
    torch.testing.assert_close(indices, hf(z))
    torch.testing.assert_close(quantized, codebook.embed(indices).movedim(-1, 2).detach())


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="ChameleonVQVAEVectorQuantizer"):
        VQCodebook.from_hf(torch.nn.Linear(3, 4))


def test_codebook_sq_cache_follows_weight_updates():
    """The cached |e|^2 is recomputed after an in-place update (an optimizer step), else quantize would
    score against stale norms."""
    codebook = VQCodebook(64, 4)
    z = torch.randn(30, 4)
    codebook.quantize(z)
    with torch.no_grad():
        codebook.weight.mul_(3).add_(1)
    indices, _ = codebook.quantize(z)
    expected = torch.cdist(z, codebook.weight.detach()).argmin(dim=1)
    torch.testing.assert_close(indices, expected)


def test_cosine_codebook_embeds_normalized_codes():
    codebook = VQCodebook(40, 8, metric="cosine")
    indices, quantized = codebook.quantize(torch.randn(10, 8))
    torch.testing.assert_close(quantized, codebook.embed(indices).detach())
    torch.testing.assert_close(quantized.norm(dim=1), torch.ones(10))
