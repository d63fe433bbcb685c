"""Drop-in modules for mPLUG-Owl2's modality-adaptive layers. They own parameters and call fastmm.ops.

mPLUG-Owl2 wraps one module per modality in a ``MultiwayNetwork`` (its ``.multiway`` ModuleList). Each class
here converts such a list in one line with identical outputs:

    norm = ModalityRMSNorm.from_modules(layer.input_layernorm.multiway)
    y = norm(hidden_states, modality)            # modality: [B, L] ids, 0 = text, 1 = image
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fastmm import ops
from fastmm.nn.multiway import module_list, stack_parameters


def _eps_of(module: nn.Module, default: float) -> float:
    # LlamaRMSNorm (transformers) calls it variance_epsilon; torch.nn.RMSNorm / LayerNorm call it eps.
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return default


class ModalityRMSNorm(nn.Module):
    """RMSNorm with one weight per modality. forward(x [..., D], modality [...], residual=None)."""

    def __init__(self, num_modalities: int, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, hidden_size, device=device, dtype=dtype))  # (M, D)

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module] | nn.Module) -> "ModalityRMSNorm":
        """Build from per-modality RMSNorm modules (LlamaRMSNorm, torch.nn.RMSNorm), in modality order."""
        found = module_list(modules)
        weight = stack_parameters(found, "weight")
        norm = cls(weight.shape[0], weight.shape[1], eps=_eps_of(found[0], 1e-6), device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        return norm

    def forward(self, x: torch.Tensor, modality: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.modality_rms_norm(x, modality, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"num_modalities={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}, eps={self.eps}"


class ModalityLayerNorm(nn.Module):
    """LayerNorm with one (weight, bias) per modality. forward(x [..., D], modality [...], residual=None)."""

    def __init__(
        self, num_modalities: int, hidden_size: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, hidden_size, device=device, dtype=dtype))  # (M, D)
        self.bias = (
            nn.Parameter(torch.zeros(num_modalities, hidden_size, device=device, dtype=dtype)) if bias else None
        )  # (M, D)

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module] | nn.Module) -> "ModalityLayerNorm":
        """Build from per-modality torch.nn.LayerNorm modules (affine), in modality order."""
        found = module_list(modules)
        weight = stack_parameters(found, "weight")
        has_bias = all(getattr(m, "bias", None) is not None for m in found)
        norm = cls(
            weight.shape[0], weight.shape[1], eps=_eps_of(found[0], 1e-5), bias=has_bias,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            norm.weight.copy_(weight)
            if has_bias:
                norm.bias.copy_(stack_parameters(found, "bias"))
        return norm

    def forward(self, x: torch.Tensor, modality: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.modality_layer_norm(x, modality, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"num_modalities={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}, eps={self.eps}"
