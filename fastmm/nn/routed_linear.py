"""RoutedLinear: mPLUG-Owl2's modality-adaptive projection (one nn.Linear per modality) as one module over
fastmm.ops.routed_linear. Converts a MultiwayNetwork of linears in one line with identical outputs:

    k_proj = RoutedLinear.from_modules(attention.k_proj.multiway)
    k = k_proj(hidden_states, modality)           # modality: [B, L] ids, 0 = text, 1 = image
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fastmm import ops
from fastmm.nn.multiway import module_list, stack_parameters


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
        found = module_list(modules)
        weight = stack_parameters(found, "weight")
        has_bias = all(getattr(m, "bias", None) is not None for m in found)
        linear = cls(weight.shape[0], weight.shape[2], weight.shape[1], bias=has_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if has_bias:
                linear.bias.copy_(stack_parameters(found, "bias"))
        return linear

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return ops.routed_linear(x, modality, self.weight, self.bias)

    def extra_repr(self) -> str:
        m, n, k = self.weight.shape
        return f"num_modalities={m}, in_features={k}, out_features={n}, bias={self.bias is not None}"
