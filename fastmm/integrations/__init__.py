"""Hugging Face transformers integration: an attention function with transformers' AttentionInterface
signature and its registration under a name, and ``patch`` / ``unpatch``, which swap fastmm's ops into a loaded
transformers model (what per model type: fastmm.integrations.plans)."""

from fastmm.integrations.attention import attention_forward, register_with_transformers
from fastmm.integrations.masks import MaskLayout, mask_layout
from fastmm.integrations.patch import PatchReport, patch, unpatch

__all__ = ["MaskLayout", "PatchReport", "attention_forward", "mask_layout", "patch", "register_with_transformers", "unpatch"]
