"""The decoding runtime: static KV cache, CUDA-graph capture of the decode step, the generation loops of the
unified model (image tokens with classifier-free guidance, and text) and visual-token pruning policies."""

from fastmm.kv_cache import KVCache
from fastmm.runtime.generate import GeneratedImages, generate_image, generate_text
from fastmm.runtime.jacobi import Jacobi
from fastmm.runtime.prune import VTW, FastV, PyramidDrop

__all__ = ["KVCache", "generate_image", "generate_text", "GeneratedImages", "Jacobi", "VTW", "FastV", "PyramidDrop"]
