"""VQCodebook: a VQ tokenizer's codebook on fastmm.ops.vq_quantize / vq_embed, a drop-in for transformers'
Chameleon, Janus and Emu3 vector quantizers (``from_hf``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmm.ops.vq import METRICS, code_scores_inputs, vq_embed, vq_quantize

# transformers' quantizer classes (by name, so transformers stays optional) and whether their forward
# returns (quantized, loss, indices) like Chameleon / Janus, or the indices alone like Emu3.
_HF_QUANTIZERS = {
    "ChameleonVQVAEVectorQuantizer": "quantized_loss_indices",
    "JanusVQVAEVectorQuantizer": "quantized_loss_indices",
    "Emu3VQVAEVectorQuantizer": "indices",
}


class VQCodebook(nn.Module):
    """K codes of dimension D; finds the nearest code per vector without an N x K distance matrix.

    Inputs are [N, D], channels-first images [B, D, H, W], or channels-first video [B, T, D, H, W] (Emu3).
    ``forward`` returns (quantized, loss, indices) like transformers' Chameleon / Janus quantizers, with their
    VQ-VAE loss for training tokenizers: mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2), sg = detach.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        metric: str = "l2",
        beta: float = 0.25,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"VQCodebook: metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.beta = beta
        self.weight = nn.Parameter(torch.empty(num_codes, dim, device=device, dtype=dtype))
        nn.init.uniform_(self.weight, -1.0 / num_codes, 1.0 / num_codes)
        self._codes_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_hf(cls, module: nn.Module) -> VQCodebook:
        """Build from a transformers ChameleonVQVAEVectorQuantizer, JanusVQVAEVectorQuantizer or
        Emu3VQVAEVectorQuantizer: the same codes (shared, not copied), metric l2, the same beta."""
        kind = type(module).__name__
        if kind not in _HF_QUANTIZERS:
            raise TypeError(f"VQCodebook.from_hf: module must be one of {sorted(_HF_QUANTIZERS)}, got {kind}")
        weight = module.embedding.weight
        codebook = cls(weight.shape[0], weight.shape[1], "l2", getattr(module, "beta", 0.25), weight.device)
        codebook.weight = weight
        return codebook

    def _scoring_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, codebook_sq) for vq_quantize with metric l2, recomputed only when the weight changed (its
        version counter moves on every in-place update, an optimizer step included). l2: the weight and |e|^2.
        cosine: the normalized codes and zeros, since the cosine argmax is argmin_k -2 z.ê_k
        (fastmm.reference.vq); caching them saves a normalization of the whole codebook per call."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if self._codes_cache is None or self._codes_cache[0] != key:
            codes, sq = code_scores_inputs(self.weight.detach(), self.metric)
            self._codes_cache = (key, codes, sq)
        return self._codes_cache[1], self._codes_cache[2]

    def quantize(self, z: torch.Tensor, return_quantized: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(indices, quantized) of fastmm.ops.vq_quantize; video [B, T, D, H, W] gives indices [B, T, H, W]."""
        codes, codebook_sq = self._scoring_codes()
        images = z.flatten(0, 1) if z.dim() == 5 else z  # video: (B*T, D, H, W), a view of a contiguous video
        indices, quantized = vq_quantize(images, codes, "l2", codebook_sq, return_quantized)
        if z.dim() != 5:
            return indices, quantized
        video_indices = indices.view(*z.shape[:2], *indices.shape[1:])
        return video_indices, None if quantized is None else quantized.view(z.shape)

    def codes(self) -> torch.Tensor:
        """The codes as quantize returns them: the weight, normalized for the cosine metric."""
        return F.normalize(self.weight, dim=1) if self.metric == "cosine" else self.weight

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """codes()[indices]: [*indices.shape, D]."""
        return vq_embed(indices, self.codes())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized straight-through for z, VQ-VAE loss, indices) for z [N, D], [B, D, H, W] or
        [B, T, D, H, W]."""
        indices, quantized = self.quantize(z)
        chosen = F.embedding(indices, self.codes())  # (..., D), differentiable for the codebook loss
        chosen = chosen.movedim(-1, z.dim() - 3)  # code dim back to z's channel dim: 1 (image), 2 (video)
        loss = F.mse_loss(chosen.detach(), z) + self.beta * F.mse_loss(chosen, z.detach())
        return quantized, loss, indices
