"""Drop-in nn.Modules built on fastmm.ops. They own parameters and call an op; no logic of their own."""

from fastmm.nn.attention import ModalityAttention
from fastmm.nn.fusion import DualResolutionEncoder, ResolutionAdapter, ResolutionAlign, from_llava_hr
from fastmm.nn.linear import Linear
from fastmm.nn.norm import ModalityLayerNorm, ModalityRMSNorm
from fastmm.nn.routed_linear import RoutedLinear
from fastmm.nn.vq import VQCodebook

__all__ = [
    "Linear",
    "ModalityRMSNorm",
    "ModalityLayerNorm",
    "RoutedLinear",
    "ModalityAttention",
    "VQCodebook",
    "ResolutionAdapter",
    "ResolutionAlign",
    "DualResolutionEncoder",
    "from_llava_hr",
]
