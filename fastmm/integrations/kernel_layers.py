"""fastmm's layers in the ``kernels`` package's layer mapping, for the modules transformers marks kernel-aware.

transformers decorates some classes with ``@use_kernel_forward_from_hub(name)`` (every RMSNorm: "RMSNorm"); when a
``kernels`` release transformers accepts is installed, such a class carries ``kernel_layer_name`` and
``kernels.kernelize`` replaces an instance's forward with the forward of the layer class its mapping names for
that layer name and device. ``fastmm.patch`` goes through that hook for those modules: it maps the layer name to
a ``Repository`` whose layer runs fastmm's op, and kernelizes each chosen module alone (one module, one mapping
scoped to the call), so nothing else in the model is touched and transformers' own hub mapping is not consulted.
Modules without the mark, or without ``kernels``, are swapped by hand (fastmm.integrations.patch).

kernels' rules for a layer class: no constructor and no members beyond ``forward`` (and the two mode flags), a
forward with the replaced forward's signature. The layer's forward therefore delegates to a function of
fastmm.integrations.patch, which reads the module's own Parameters and fastmm's record on the instance.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from torch import nn

# Layer names transformers gives kernel-aware classes, and the fastmm swap kind each one is.
KERNEL_LAYER_KINDS = {"RMSNorm": "rms_norm"}
# The instance attribute kernels.kernelize sets next to the forward (the repository in use).
KERNEL_REPO_ATTRIBUTE = "_kernel_repo"


class Repository:
    """A kernels repository (``load()`` returns the layer class) holding one of fastmm's layers in memory."""

    def __init__(self, layer_name: str, forward: Callable):
        self.layer_name = layer_name
        # can_torch_compile / has_backward: fastmm's ops are custom ops with fakes and autograd
        self._layer = type(f"Fastmm{layer_name}", (nn.Module,), {
            "forward": lambda self, hidden_states: forward(self, hidden_states),
            "can_torch_compile": True,
            "has_backward": True,
        })  # fmt: skip

    def load(self) -> type[nn.Module]:
        return self._layer

    def __eq__(self, other) -> bool:
        return isinstance(other, Repository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("fastmm", self.layer_name))

    def __str__(self) -> str:
        return f"fastmm ({self.layer_name})"


def kernel_layer_kind(module: nn.Module) -> str | None:
    """The swap kind of ``module``'s kernel-aware class (its ``kernel_layer_name``), or None: no mark, no mapping,
    or no ``kernels``."""
    kind = KERNEL_LAYER_KINDS.get(getattr(type(module), "kernel_layer_name", None))
    if kind is None or importlib.util.find_spec("kernels") is None:
        return None
    return kind


def kernelize(module: nn.Module, repository: Repository) -> bool:
    """Give ``module`` the forward of ``repository``'s layer through ``kernels.kernelize``; whether it took (kernels
    may keep the original forward, e.g. for a device type it has no slot for)."""
    from kernels import Mode, kernelize, use_kernel_mapping

    device = next(module.parameters()).device
    mode = Mode.TRAINING if module.training else Mode.INFERENCE
    with use_kernel_mapping({repository.layer_name: {device.type: repository}}, inherit_mapping=False):
        kernelize(module, mode=mode, device=device.type)
    return module.__dict__.get(KERNEL_REPO_ATTRIBUTE) == repository
