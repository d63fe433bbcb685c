"""Hugging Face transformers integration: an attention function with transformers' AttentionInterface
signature, and its registration under a name (model patching comes with fastmm.patch)."""

from fastmm.integrations.attention import attention_forward, register_with_transformers
from fastmm.integrations.masks import MaskLayout, mask_layout

__all__ = ["MaskLayout", "attention_forward", "mask_layout", "register_with_transformers"]
