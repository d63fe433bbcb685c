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


def _module_list(modules: Iterable[nn.Module] | nn.Module) -> list[nn.Module]:
    """Accept a list of per-modality modules, or a MultiwayNetwork-like module holding them in .multiway."""
    found = list(modules.multiway) if hasattr(modules, "multiway") else list(modules)
    if not found:
        raise ValueError("from_modules: expected at least one per-modality module, got none")
    return found


def _eps_of(module: nn.Module, default: float) -> float:
    # LlamaRMSNorm (transformers) calls it variance_epsilon; torch.nn.RMSNorm / LayerNorm call it eps.
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return default


def _stack(modules: list[nn.Module], name: str) -> torch.Tensor:
    tensors = [getattr(m, name, None) for m in modules]
    if any(t is None for t in tensors):
        raise ValueError(f"from_modules: every module needs a .{name} tensor, got {[type(m).__name__ for m in modules]}")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"from_modules: every module's .{name} must have one shape, got {sorted(shapes)}")
    return torch.stack([t.detach() for t in tensors])


class ModalityRMSNorm(nn.Module):
    """RMSNorm with one weight per modality. forward(x [..., D], modality [...], residual=None)."""

    def __init__(self, num_modalities: int, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, hidden_size, device=device, dtype=dtype))  # (M, D)

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module] | nn.Module) -> "ModalityRMSNorm":
        """Build from per-modality RMSNorm modules (LlamaRMSNorm, torch.nn.RMSNorm), in modality order."""
        found = _module_list(modules)
        weight = _stack(found, "weight")
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
        found = _module_list(modules)
        weight = _stack(found, "weight")
        has_bias = all(getattr(m, "bias", None) is not None for m in found)
        norm = cls(
            weight.shape[0], weight.shape[1], eps=_eps_of(found[0], 1e-5), bias=has_bias,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            norm.weight.copy_(weight)
            if has_bias:
                norm.bias.copy_(_stack(found, "bias"))
        return norm

    def forward(self, x: torch.Tensor, modality: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.modality_layer_norm(x, modality, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"num_modalities={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}, eps={self.eps}"


class RoutedLinear(nn.Module):
    """Linear layer with one weight per modality. forward(x [..., K], modality [...]) -> [..., N]."""

    def __init__(
        self, num_modalities: int, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features, **factory))  # (M, N, K)
        self.bias = nn.Parameter(torch.empty(num_modalities, out_features, **factory)) if bias else None  # (M, N)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as one nn.Linear per modality.
        bound = self.weight.shape[2] ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module] | nn.Module) -> "RoutedLinear":
        """Build from per-modality torch.nn.Linear modules, in modality order."""
        found = _module_list(modules)
        weight = _stack(found, "weight")
        has_bias = all(getattr(m, "bias", None) is not None for m in found)
        linear = cls(weight.shape[0], weight.shape[2], weight.shape[1], bias=has_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if has_bias:
                linear.bias.copy_(_stack(found, "bias"))
        return linear

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return ops.routed_linear(x, modality, self.weight, self.bias)

    def extra_repr(self) -> str:
        m, n, k = self.weight.shape
        return f"num_modalities={m}, in_features={k}, out_features={n}, bias={self.bias is not None}"
