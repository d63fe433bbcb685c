// decode_layer: one decoder layer of a decode step (B rows, one new token each) in a single native call.
//
// The Python path runs a layer as about 18 ops, each paying tens of microseconds of validation, launch and
// allocation: at the 8 x 512 benchmark model that overhead was as large as streaming the weights. Here the
// same kernels run back to back on preallocated scratch:
//
//   s = x (+ residual);  h = rms_norm(s) * input_norm[m]                 rms_norm_fwd (fused add)
//   qkv = h Wqkv^T (+ b)                                                 skinny_linear
//   q, k = rope(q, k) at positions;  cache[positions] = k, v             rotate_and_cache (here)
//   o = decode_attention(q, cache, positions + 1)                        decode_attention_fwd
//   a = o Wo^T (+ b);  s2 = a + s;  h2 = rms_norm(s2) * post_norm[m]     skinny_linear, rms_norm_fwd
//   gate, up = h2 Wgu^T (+ b);  x_out = (silu(gate) * up) Wdown^T (+ b)  skinny_linear, swiglu (here)
//
// RoPE repeats fastmm.nn.attention.apply_rope's fp32 operations one for one, so q, k and the cache match the
// Python path bit for bit; SiLU takes exp_lanes (about 2 ulp), which differs from torch's vectorized exp in
// the last bit now and then.
#include "decode_layer.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "attention.h"
#include "common.h"
#include "linear.h"
#include "norm.h"

// a * b + c must round twice, as torch's separate multiply and add kernels do: GCC at -O3 -march=native would
// contract it into one FMA (-ffp-contract=fast). As in sampling.cpp.
#pragma GCC optimize("fp-contract=off")

namespace fastmm {
namespace {

constexpr int kFloat32 = static_cast<int>(DType::kFloat32);

// Where each intermediate starts in the scratch buffer, in floats.
struct ScratchLayout {
  int64_t stream;     // [B, H]: s = x + residual, the residual stream into attention
  int64_t normed;     // [B, H]: h, then h2
  int64_t qkv;        // [B, (Hq + 2 Hkv) d]
  int64_t q;          // [B, Hq, d]: rotated, as decode attention reads it
  int64_t attended;   // [B, Hq d]
  int64_t projected;  // [B, H]: a
  int64_t gate_up;    // [B, 2 I]
  int64_t swiglu;     // [B, I]
  int64_t rstd;       // [B]: the norms' statistics, unused here
  int64_t size;

  explicit ScratchLayout(const DecodeLayerShape& sh) {
    const int64_t B = sh.batch;
    int64_t end = 0;
    const auto take = [&](int64_t floats) {
      const int64_t start = end;
      end += floats;
      return start;
    };
    stream = take(B * sh.hidden);
    normed = take(B * sh.hidden);
    qkv = take(B * (sh.q_heads + 2 * sh.kv_heads) * sh.head_dim);
    q = take(B * sh.q_heads * sh.head_dim);
    attended = take(B * sh.q_heads * sh.head_dim);
    projected = take(B * sh.hidden);
    gate_up = take(B * 2 * sh.intermediate);
    swiglu = take(B * sh.intermediate);
    rstd = take(B);
    size = end;
  }
};

// out = x * cos + rotate_half(x) * sin for one head of d values, rotate_half(x) = (-x[d/2:], x[:d/2]) as in
// apply_rope. (-a) * b + c rounds exactly like c - a * b, so the first half needs no negation.
void rotate_head(const float* x, const float* cos, const float* sin, float* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
#pragma omp simd
  for (int64_t i = half; i < head_dim; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// The rotated q heads of every row into q [B, Hq, d]; the rotated k heads and the v heads into the cache at
// the row's position.
void rotate_and_cache(const DecodeLayerShape& sh, const DecodeLayerIO& io, const float* qkv, float* q) {
  const int64_t d = sh.head_dim, Hq = sh.q_heads, Hkv = sh.kv_heads;
  for (int64_t b = 0; b < sh.batch; ++b) {
    const int64_t position = io.positions[b];
    const float* cos = io.rope_cos + position * d;
    const float* sin = io.rope_sin + position * d;
    const float* heads = qkv + b * (Hq + 2 * Hkv) * d;  // q heads, k heads, v heads
    for (int64_t h = 0; h < Hq; ++h) rotate_head(heads + h * d, cos, sin, q + (b * Hq + h) * d, d);
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t slot = ((b * Hkv + h) * sh.cache_size + position) * d;
      rotate_head(heads + (Hq + h) * d, cos, sin, io.k_cache + slot, d);
      std::memcpy(io.v_cache + slot, heads + (Hq + Hkv + h) * d, d * sizeof(float));
    }
  }
}

// out [B, I] = silu(gate) * up for gate_up [B, 2 I], silu(g) = g / (1 + e^-g) as F.silu computes it; each
// product rounded on its own, as two torch ops would.
void swiglu(const float* gate_up, float* out, int64_t batch, int64_t width) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* gate = gate_up + b * 2 * width;
    const float* up = gate + width;
    float* dst = out + b * width;
    for_each_block(width, [=](int64_t j, auto n) {
      const f32x16 g = load_block(gate + j, n);  // lanes past a partial block are 0: e^0, no NaN
      store_block(dst + j, g / (1.f + exp_lanes(-g)) * load_block(up + j, n), n);
    });
  }
}

void check_shape(const DecodeLayerShape& sh, int num_threads, int attention_threads) {
  const char* op = "decode_layer";
  FASTMM_CHECK(sh.batch >= 1 && sh.hidden >= 1 && sh.intermediate >= 1 && sh.cache_size >= 1, op,
               "batch, hidden, intermediate and cache_size must be >= 1");
  FASTMM_CHECK(sh.kv_heads >= 1 && sh.q_heads >= 1 && sh.q_heads % sh.kv_heads == 0, op,
               "q_heads must be a multiple of kv_heads >= 1, got " + std::to_string(sh.q_heads) + " and " +
                   std::to_string(sh.kv_heads));
  FASTMM_CHECK(sh.head_dim >= 2 && sh.head_dim % 2 == 0, op,
               "head_dim must be even and >= 2, got " + std::to_string(sh.head_dim));
  FASTMM_CHECK(num_threads >= 1 && attention_threads >= 1, op, "thread counts must be >= 1");
}

}  // namespace

// ---- entry points (bound in bindings.cpp) ---------------------------------------------------------------

int64_t decode_layer_scratch_size(const DecodeLayerShape& shape) { return ScratchLayout(shape).size; }

void decode_layer(const DecodeLayerShape& sh, const DecodeLayerWeights& w, const DecodeLayerIO& io,
                  int num_threads, int attention_threads) {
  check_shape(sh, num_threads, attention_threads);
  const ScratchLayout at(sh);
  FASTMM_CHECK(io.scratch_size >= at.size, "decode_layer",
               "scratch holds " + std::to_string(io.scratch_size) + " floats, needs " + std::to_string(at.size));
  const int64_t B = sh.batch, H = sh.hidden, I = sh.intermediate, d = sh.head_dim;
  const int64_t q_width = sh.q_heads * d, qkv_width = (sh.q_heads + 2 * sh.kv_heads) * d;
  float* scratch = io.scratch;
  float* normed = scratch + at.normed;
  float* rstd = scratch + at.rstd;

  // Attention block. The residual stream into it is s = x + residual, or x itself at layer 0 (no residual).
  float* sum = io.residual ? scratch + at.stream : nullptr;
  const float* stream = sum ? sum : io.x;
  rms_norm_fwd(io.x, io.modality, w.input_norm, io.residual, normed, sum, rstd, B, H, w.input_norm_eps, kFloat32, 1);
  skinny_linear(normed, H, w.qkv, H, w.qkv_bias, scratch + at.qkv, B, H, qkv_width, kFloat32, num_threads);
  rotate_and_cache(sh, io, scratch + at.qkv, scratch + at.q);
  std::vector<int32_t> cache_len(io.positions, io.positions + B);  // B ints; the kernels allocate more
  for (int32_t& length : cache_len) length += 1;                    // the new token is the last one attended
  decode_attention_fwd(scratch + at.q, io.k_cache, io.v_cache, cache_len.data(), scratch + at.attended, B,
                       sh.q_heads, sh.kv_heads, 1, sh.cache_size, d, std::pow(static_cast<double>(d), -0.5),
                       kFloat32, attention_threads);  // the scale as Python's d ** -0.5
  skinny_linear(scratch + at.attended, q_width, w.o, q_width, w.o_bias, scratch + at.projected, B, q_width, H,
                kFloat32, num_threads);

  // MLP block.
  rms_norm_fwd(scratch + at.projected, io.modality, w.post_attention_norm, stream, normed, io.residual_out, rstd, B,
               H, w.post_attention_norm_eps, kFloat32, 1);
  skinny_linear(normed, H, w.gate_up, H, w.gate_up_bias, scratch + at.gate_up, B, H, 2 * I, kFloat32, num_threads);
  swiglu(scratch + at.gate_up, scratch + at.swiglu, B, I);
  skinny_linear(scratch + at.swiglu, I, w.down, I, w.down_bias, io.x_out, B, I, H, kFloat32, num_threads);
}

}  // namespace fastmm
