// The `attention` family's CPU kernels (attention.cpp): span attention over per-query key ranges and decode
// attention over a static KV cache. Tensors are raw, contiguous, row-major buffers in the fastmm::DType
// `dtype` (q, k, v and o share it; lse is fp32, ranges and lengths int32). Callers validate shapes, dtypes and
// the range values (0 <= kv_start <= kv_end <= num_keys, num_queries <= cache_len <= cache_size) before the
// call (fastmm/native/attention.py): the kernels index K and V with them unchecked.
#pragma once

#include <cstdint>

namespace fastmm {
// Optional masking on top of the key ranges (span) or the cache lengths (decode); null / 0 members are off.
// A query attends a key only where every given member allows it; its logit is q.k * scale, then
// softcap * tanh(logit / softcap), then + bias.
struct Masking {
  const uint8_t* key_keep = nullptr;  // [batch, num_keys]: 0 drops key j for every query of the row (span only)
  const uint8_t* allowed = nullptr;   // [batch, num_queries, num_keys]: 0 drops the (query, key) pair
  const float* bias = nullptr;        // [batch, num_queries, num_keys]: added to the logits, natural units
  float softcap = 0.f;                // > 0 caps the logits
};

// q, o [batch, q_heads, num_queries, head_dim]; k, v [batch, kv_heads, num_keys, head_dim]; kv_start, kv_end
// [batch, num_queries] (indices of the num_keys keys); lse [batch, q_heads, num_queries]. q_heads is a multiple
// of kv_heads.
void span_attention_fwd(const void* q, const void* k, const void* v, const int32_t* kv_start,
                        const int32_t* kv_end, void* o, float* lse, int64_t batch, int64_t q_heads,
                        int64_t kv_heads, int64_t num_queries, int64_t num_keys, int64_t head_dim, double scale,
                        int dtype, int num_threads, const Masking& masking = {});
// q, o [batch, q_heads, num_queries, head_dim]; k_cache, v_cache [batch, kv_heads, cache_size, head_dim];
// cache_len [batch]. Query i of row b attends keys j < cache_len[b] - num_queries + i + 1. lse (optional, may
// be null) [batch, q_heads, num_queries]; masking.key_keep is not used (fold it into masking.allowed).
void decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_len,
                          void* o, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries,
                          int64_t cache_size, int64_t head_dim, double scale, int dtype, int num_threads,
                          const Masking& masking = {}, float* lse = nullptr);
}  // namespace fastmm
