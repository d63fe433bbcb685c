// One decoder layer of a decode step in one call (decode_layer.cpp): fastmm/models/decoder.py's DecoderLayer
// for B rows of L new tokens each (causal among them), composed from the norm, linear and attention kernels.
// Weights, activations and the cache share one element type, the fastmm::DType `dtype` (fp32, fp16 or bf16);
// the RoPE tables are fp32. Buffers are raw, contiguous and row-major; callers validate every shape, pointer and
// value before the call (fastmm/native/decode_layer.py): the kernel indexes the norm weights with the modality ids and the cache and
// RoPE tables with the positions and cache lengths, unchecked.
#pragma once

#include <cstdint>

namespace fastmm {

// Sizes of the layer and of its batch.
struct DecodeLayerShape {
  int64_t batch;                     // B sequences
  int64_t tokens;                    // L new tokens each (consecutive positions), >= 1
  int64_t hidden;                    // H
  int64_t q_heads;                   // Hq, a multiple of kv_heads
  int64_t kv_heads;                  // Hkv
  int64_t head_dim;                  // d, even (RoPE rotates pairs)
  int64_t intermediate;              // I, the SwiGLU width
  int64_t cache_size;                // S, cached positions per (row, kv head)
};

// The layer's parameters; a null bias is no bias.
struct DecodeLayerWeights {
  const void* input_norm;            // [M, H], row m for the tokens of modality m
  double input_norm_eps;
  const void* qkv;                   // [(Hq + 2 Hkv) d, H]: the q heads, then k, then v; each head d rows
  const void* qkv_bias;              // [(Hq + 2 Hkv) d] or null
  const void* o;                     // [H, Hq d]
  const void* o_bias;                // [H] or null
  const void* post_attention_norm;   // [M, H]
  double post_attention_norm_eps;
  const void* gate_up;               // [2 I, H]: gate rows, then up rows
  const void* gate_up_bias;          // [2 I] or null
  const void* down;                  // [H, I]
  const void* down_bias;             // [H] or null
};

// What one call reads and writes besides the parameters.
struct DecodeLayerIO {
  const void* x;                     // [B L, H]: the previous layer's output (the embeddings at layer 0)
  const void* residual;              // [B L, H], or null at layer 0 (the residual stream is x itself)
  const int64_t* modality;           // [B L], ids in [0, M)
  const int32_t* positions;          // [B]: the RoPE position of row b's first new token; + L <= P
  const int32_t* cache_lengths;      // [B]: this layer's valid entries of row b before the step; + L <= S: where the
                                     // tokens go (below positions[b] where a pruned prefill dropped tokens)
  const float* rope_cos;             // [P, d], P > every position: row p holds the cosines of position p
  const float* rope_sin;             // [P, d]
  void* k_cache;                     // [B, Hkv, S, d]: this layer's keys, written at cache_lengths
  void* v_cache;                     // [B, Hkv, S, d]
  void* x_out;                       // [B L, H]: the MLP's output; may be x (x is read before it is written)
  void* residual_out;                // [B L, H]: the residual stream after attention; may be residual (likewise)
  void* scratch;                     // [scratch_size]: every intermediate
  int64_t scratch_size;              // bytes at scratch (64-byte aligned), at least decode_layer_scratch_size
};

// Bytes of scratch one call needs in `dtype`.
int64_t decode_layer_scratch_size(const DecodeLayerShape& shape, int dtype);

// x_out, residual_out = DecoderLayer(x, residual) with prefill=False, and the tokens' k, v written into the
// cache. GEMMs run on num_threads, attention on attention_threads (as their own launchers pick them), the
// norms and the element-wise loops on one.
void decode_layer(const DecodeLayerShape& shape, const DecodeLayerWeights& weights, const DecodeLayerIO& io,
                  int dtype, int num_threads, int attention_threads);

}  // namespace fastmm
