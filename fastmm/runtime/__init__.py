"""The decoding runtime: static KV cache (and, with the unified model, sampling and generation loops)."""

from fastmm.runtime.kv_cache import KVCache

__all__ = ["KVCache"]
