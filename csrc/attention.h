// The `attention` family's CPU kernels (attention.cpp): span attention over per-query key ranges and decode
// attention over a static KV cache. Tensors are raw, contiguous, row-major buffers in the fastmm::DType
// `dtype` (q, k, v and o share it; lse is fp32, ranges and lengths int32). Callers validate shapes, dtypes and
// the range values (0 <= kv_start <= kv_end <= length, num_queries <= cache_len <= cache_size) before the call
// (fastmm/native/attention.py): the kernels index K and V with them unchecked.
#pragma once

#include <cstdint>

namespace fastmm {
// q, o [batch, q_heads, length, head_dim]; k, v [batch, kv_heads, length, head_dim]; kv_start, kv_end
// [batch, length]; lse [batch, q_heads, length]. q_heads is a multiple of kv_heads.
void span_attention_fwd(const void* q, const void* k, const void* v, const int32_t* kv_start,
                        const int32_t* kv_end, void* o, float* lse, int64_t batch, int64_t q_heads,
                        int64_t kv_heads, int64_t length, int64_t head_dim, double scale, int dtype,
                        int num_threads);
// q, o [batch, q_heads, num_queries, head_dim]; k_cache, v_cache [batch, kv_heads, cache_size, head_dim];
// cache_len [batch]. Query i of row b attends keys j < cache_len[b] - num_queries + i + 1.
void decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_len,
                          void* o, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries,
                          int64_t cache_size, int64_t head_dim, double scale, int dtype, int num_threads);
}  // namespace fastmm
