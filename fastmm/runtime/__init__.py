"""The decoding runtime: static KV cache, CUDA-graph capture of the decode step, and the generation loops of
the unified model (image tokens with classifier-free guidance, and text)."""

from fastmm.runtime.generate import GeneratedImages, generate_image, generate_text
from fastmm.kv_cache import KVCache

__all__ = ["KVCache", "generate_image", "generate_text", "GeneratedImages"]
