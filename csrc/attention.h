// The `attention` family's CPU kernels (attention.cpp): span attention over per-query key ranges and decode
// attention over a static KV cache.
#pragma once

#include <cstdint>

#include "tensor_arg.h"

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

// The decode kernel, for callers that checked their buffers and lengths (decode_layer.cpp): raw, contiguous,
// row-major buffers in the fastmm::DType `dtype`. q, o [batch, q_heads, num_queries, head_dim]; k_cache,
// v_cache [batch, kv_heads, cache_size, head_dim], q_heads a multiple of kv_heads; cache_len [batch] int32 with
// num_queries <= cache_len <= cache_size (indexes the cache unchecked). Query i of row b attends keys
// j < cache_len[b] - num_queries + i + 1. lse (optional, may be null) [batch, q_heads, num_queries] fp32;
// masking.key_keep is not used (fold it into masking.allowed).
void decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_len,
                          void* o, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries,
                          int64_t cache_size, int64_t head_dim, double scale, int dtype, int num_threads,
                          const Masking& masking = {}, float* lse = nullptr);

// The entry points, fastmm._C.<name>. Every tensor is contiguous: q [B, Hq, Lq, d] in a float dtype; k, v
// (k_cache, v_cache) [B, Hkv, S, d] in q's dtype, Hkv >= 1 dividing Hq, d >= 1; o [B, Hq, Lq, d] and lse
// [B, Hq, Lq] float32 written. Optional masking as in Masking: key_keep [B, S] bool, allowed [B, Lq, S] bool,
// bias [B, Lq, S] float32, softcap >= 0.
namespace entry {
// Query i of row b attends keys kv_start[b, i] <= j < kv_end[b, i]: kv_start, kv_end [B, Lq] int32 with
// 0 <= start <= end <= S.
void span_attention_fwd(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& kv_start,
                        const TensorArg& kv_end, const TensorArg& o, const TensorArg& lse, const TensorArg& key_keep,
                        const TensorArg& allowed, const TensorArg& bias, double scale, double softcap,
                        int num_threads);
// The kernel above: cache_len [B] int32 with Lq <= cache_len <= S.
void decode_attention_fwd(const TensorArg& q, const TensorArg& k_cache, const TensorArg& v_cache,
                          const TensorArg& cache_len, const TensorArg& o, const TensorArg& lse,
                          const TensorArg& allowed, const TensorArg& bias, double scale, double softcap,
                          int num_threads);
}  // namespace entry

}  // namespace fastmm
