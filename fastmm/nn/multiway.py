"""Reading mPLUG-Owl2's per-modality modules (a ``MultiwayNetwork`` or a plain list): what the ``from_modules``
constructors of the modality-adaptive norms and of RoutedLinear share."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def module_list(modules: Iterable[nn.Module] | nn.Module) -> list[nn.Module]:
    """Accept a list of per-modality modules, or a MultiwayNetwork-like module holding them in .multiway."""
    found = list(modules.multiway) if hasattr(modules, "multiway") else list(modules)
    if not found:
        raise ValueError("from_modules: expected at least one per-modality module, got none")
    return found


def stack_parameters(modules: list[nn.Module], name: str) -> torch.Tensor:
    """The modules' ``.<name>`` tensors stacked along a new modality dim 0 (detached), refused unless every
    module has one of the same shape."""
    tensors = [getattr(m, name, None) for m in modules]
    if any(t is None for t in tensors):
        raise ValueError(f"from_modules: every module needs a .{name} tensor, got {[type(m).__name__ for m in modules]}")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"from_modules: every module's .{name} must have one shape, got {sorted(shapes)}")
    return torch.stack([t.detach() for t in tensors])
