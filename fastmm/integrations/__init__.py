"""Hugging Face transformers integration: an attention function with transformers' AttentionInterface
signature, and its registration under a name (model patching comes with fastmm.patch)."""

from fastmm.integrations.attention import attention_forward, ranges_from_mask, register_with_transformers

__all__ = ["attention_forward", "ranges_from_mask", "register_with_transformers"]
