// decode_layer: one decoder layer of a decode step (B rows, L new tokens each: one for plain decoding, a window
// for speculative Jacobi decoding) in a single native call.
//
// The Python path runs a layer as about 18 ops, each paying tens of microseconds of validation, launch and
// allocation: at the 8 x 512 benchmark model that overhead was as large as streaming the weights. Here the
// same kernels run back to back on preallocated scratch:
//
//   s = x (+ residual);  h = rms_norm(s) * input_norm[m]                 rms_norm_fwd (fused add)
//   qkv = h Wqkv^T (+ b)                                                 skinny_linear
//   q, k = rope(q, k) at positions + t;  cache[lengths + t] = k, v       rotate_and_cache (here)
//   o = decode_attention(q, cache, lengths + L)  (causal in the window)  decode_attention_fwd
//   a = o Wo^T (+ b);  s2 = a + s;  h2 = rms_norm(s2) * post_norm[m]     skinny_linear, rms_norm_fwd
//   gate, up = h2 Wgu^T (+ b);  x_out = (silu(gate) * up) Wdown^T (+ b)  skinny_linear, swiglu (here)
//
// Every element type takes the Python path's rounding points: each kernel's output is stored in the model's
// dtype, RoPE works in fp32 and rounds once (apply_rope), and SwiGLU rounds silu(gate) before multiplying by up
// (F.silu, then *). In fp32 RoPE repeats apply_rope's operations one for one, so q, k and the cache match the
// Python path bit for bit; SiLU takes exp_lanes (about 2 ulp), which differs from torch's vectorized exp in
// the last bit now and then.
#include "decode_layer.h"

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "common.h"
#include "module.h"
#include "linear.h"
#include "norm.h"

// a * b + c must round twice, as torch's separate multiply and add kernels do: GCC at -O3 -march=native would
// contract it into one FMA (-ffp-contract=fast). As in sampling.cpp.
#pragma GCC optimize("fp-contract=off")

namespace fastmm {
namespace {

// Where each intermediate starts in the scratch buffer, in bytes: the norms' fp32 statistics, then the
// activations in the model's element type, each region starting on a 64-byte line.
struct ScratchLayout {
  int64_t rstd;       // [B] fp32: the norms' statistics, unused here
  int64_t stream;     // [B, H]: s = x + residual, the residual stream into attention
  int64_t normed;     // [B, H]: h, then h2
  int64_t qkv;        // [B, (Hq + 2 Hkv) d]
  int64_t q;          // [B, Hq, L, d]: rotated, as decode attention reads it
  int64_t attended;   // [B, Hq, L, d]: decode attention's output
  int64_t tokens;     // [B L, Hq d]: the same, token-major for the o projection (used when L > 1)
  int64_t projected;  // [B, H]: a
  int64_t gate_up;    // [B, 2 I]
  int64_t swiglu;     // [B, I]
  int64_t size;

  ScratchLayout(const DecodeLayerShape& sh, int64_t element_size) {
    const int64_t B = sh.batch * sh.tokens;  // rows: every token of every sequence
    int64_t end = 0;
    const auto take = [&](int64_t elements, int64_t size_of) {
      const int64_t start = end;
      end += (elements * size_of + 63) / 64 * 64;
      return start;
    };
    rstd = take(B, sizeof(float));
    stream = take(B * sh.hidden, element_size);
    normed = take(B * sh.hidden, element_size);
    qkv = take(B * (sh.q_heads + 2 * sh.kv_heads) * sh.head_dim, element_size);
    q = take(B * sh.q_heads * sh.head_dim, element_size);
    attended = take(B * sh.q_heads * sh.head_dim, element_size);
    tokens = sh.tokens > 1 ? take(B * sh.q_heads * sh.head_dim, element_size) : attended;
    projected = take(B * sh.hidden, element_size);
    gate_up = take(B * 2 * sh.intermediate, element_size);
    swiglu = take(B * sh.intermediate, element_size);
    size = end;
  }
};

int64_t element_size(int dtype) {
  int64_t size = 0;
  dispatch_dtype(dtype, [&](auto zero) { size = sizeof(zero); });
  return size;
}

// out = x * cos + rotate_half(x) * sin for one head of d values, rotate_half(x) = (-x[d/2:], x[:d/2]) as in
// apply_rope: fp32 math, one rounding to T at the end. (-a) * b + c rounds exactly like c - a * b, so the first
// half needs no negation.
template <typename T>
void rotate_head(const T* x, const float* cos, const float* sin, T* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = from_float<T>(to_float(x[i]) * cos[i] - to_float(x[i + half]) * sin[i]);
  }
  for (int64_t i = half; i < head_dim; ++i) {
    out[i] = from_float<T>(to_float(x[i]) * cos[i] + to_float(x[i - half]) * sin[i]);
  }
}

// Token t of row b: its rotated q heads into q [B, Hq, L, d]; its rotated k heads and its v heads into the cache
// at the row's cache length + t (rotated by the row's position + t, which a pruned prefill leaves larger).
template <typename T>
void rotate_and_cache(const DecodeLayerShape& sh, const DecodeLayerIO& io, const T* qkv, T* q) {
  const int64_t d = sh.head_dim, Hq = sh.q_heads, Hkv = sh.kv_heads, L = sh.tokens;
  T* k_cache = static_cast<T*>(io.k_cache);
  T* v_cache = static_cast<T*>(io.v_cache);
  for (int64_t b = 0; b < sh.batch; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      const int64_t position = io.positions[b] + t;
      const float* cos = io.rope_cos + position * d;
      const float* sin = io.rope_sin + position * d;
      const T* heads = qkv + (b * L + t) * (Hq + 2 * Hkv) * d;  // q heads, k heads, v heads
      for (int64_t h = 0; h < Hq; ++h) rotate_head(heads + h * d, cos, sin, q + ((b * Hq + h) * L + t) * d, d);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t slot = ((b * Hkv + h) * sh.cache_size + io.cache_lengths[b] + t) * d;
        rotate_head(heads + (Hq + h) * d, cos, sin, k_cache + slot, d);
        std::memcpy(v_cache + slot, heads + (Hq + Hkv + h) * d, d * sizeof(T));
      }
    }
  }
}

// attended [B, Hq, L, d] -> tokens [B, L, Hq, d]: token-major rows for the o projection.
template <typename T>
void heads_to_tokens(const DecodeLayerShape& sh, const T* attended, T* tokens) {
  const int64_t d = sh.head_dim, Hq = sh.q_heads, L = sh.tokens;
  for (int64_t b = 0; b < sh.batch; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t t = 0; t < L; ++t) {
        std::memcpy(tokens + ((b * L + t) * Hq + h) * d, attended + ((b * Hq + h) * L + t) * d, d * sizeof(T));
      }
    }
  }
}

// v rounded to T and widened back: the value a T tensor would hold between two torch ops.
template <typename T>
f32x16 round_lanes(f32x16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T rounded[kBlock];
    store_block(rounded, v, FullBlock{});
    return load_block(rounded, FullBlock{});
  }
}

// out [B, I] = silu(gate) * up for gate_up [B, 2 I], silu(g) = g / (1 + e^-g) as F.silu computes it; silu and
// the product each rounded to T on their own, as two torch ops would.
template <typename T>
void swiglu(const T* gate_up, T* out, int64_t batch, int64_t width) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* gate = gate_up + b * 2 * width;
    const T* up = gate + width;
    T* dst = out + b * width;
    for_each_block(width, [=](int64_t j, auto n) {
      const f32x16 g = load_block(gate + j, n);  // lanes past a partial block are 0: e^0, no NaN
      store_block(dst + j, round_lanes<T>(g / (1.f + exp_lanes(-g))) * load_block(up + j, n), n);
    });
  }
}

template <typename T>
void run_layer(const DecodeLayerShape& sh, const DecodeLayerWeights& w, const DecodeLayerIO& io, int dtype,
               int num_threads, int attention_threads) {
  const ScratchLayout at(sh, sizeof(T));
  const int64_t B = sh.batch * sh.tokens, H = sh.hidden, I = sh.intermediate, d = sh.head_dim;  // B: rows
  const int64_t q_width = sh.q_heads * d, qkv_width = (sh.q_heads + 2 * sh.kv_heads) * d;
  char* scratch = static_cast<char*>(io.scratch);
  const auto region = [&](int64_t offset) { return reinterpret_cast<T*>(scratch + offset); };
  float* rstd = reinterpret_cast<float*>(scratch + at.rstd);
  T* normed = region(at.normed);
  T* qkv = region(at.qkv);
  T* q = region(at.q);
  T* attended = region(at.attended);
  T* token_major = region(at.tokens);
  T* projected = region(at.projected);
  T* gate_up = region(at.gate_up);
  T* activated = region(at.swiglu);

  // Attention block. The residual stream into it is s = x + residual, or x itself at layer 0 (no residual).
  T* sum = io.residual ? region(at.stream) : nullptr;
  const void* stream = sum ? static_cast<const void*>(sum) : io.x;
  rms_norm_fwd(io.x, io.modality, w.input_norm, io.residual, normed, sum, rstd, B, H, w.input_norm_eps, dtype, 1);
  skinny_linear(normed, H, w.qkv, H, w.qkv_bias, qkv, B, H, qkv_width, dtype, num_threads);
  rotate_and_cache<T>(sh, io, qkv, q);
  std::vector<int32_t> cache_len(io.cache_lengths, io.cache_lengths + sh.batch);  // the kernels allocate more
  for (int32_t& length : cache_len) length += static_cast<int32_t>(sh.tokens);   // the new tokens are attended last
  decode_attention_fwd(q, io.k_cache, io.v_cache, cache_len.data(), attended, sh.batch, sh.q_heads, sh.kv_heads,
                       sh.tokens, sh.cache_size, d, std::pow(static_cast<double>(d), -0.5), dtype,
                       attention_threads);  // the scale as Python's d ** -0.5
  if (sh.tokens > 1) heads_to_tokens<T>(sh, attended, token_major);
  skinny_linear(token_major, q_width, w.o, q_width, w.o_bias, projected, B, q_width, H, dtype, num_threads);

  // MLP block.
  rms_norm_fwd(projected, io.modality, w.post_attention_norm, stream, normed, io.residual_out, rstd, B, H,
               w.post_attention_norm_eps, dtype, 1);
  skinny_linear(normed, H, w.gate_up, H, w.gate_up_bias, gate_up, B, H, 2 * I, dtype, num_threads);
  swiglu(gate_up, activated, B, I);
  skinny_linear(activated, I, w.down, I, w.down_bias, io.x_out, B, I, H, dtype, num_threads);
}

void check_shape(const DecodeLayerShape& sh, int num_threads, int attention_threads) {
  const char* op = "decode_layer";
  FASTMM_CHECK(sh.batch >= 1 && sh.tokens >= 1 && sh.hidden >= 1 && sh.intermediate >= 1 && sh.cache_size >= 1, op,
               "batch, tokens, hidden, intermediate and cache_size must be >= 1");
  FASTMM_CHECK(sh.kv_heads >= 1 && sh.q_heads >= 1 && sh.q_heads % sh.kv_heads == 0, op,
               "q_heads must be a multiple of kv_heads >= 1, got " + std::to_string(sh.q_heads) + " and " +
                   std::to_string(sh.kv_heads));
  FASTMM_CHECK(sh.head_dim >= 2 && sh.head_dim % 2 == 0, op,
               "head_dim must be even and >= 2, got " + std::to_string(sh.head_dim));
  FASTMM_CHECK(num_threads >= 1 && attention_threads >= 1, op, "thread counts must be >= 1");
}

}  // namespace

// ---- entry points (registered at the bottom of this file) -----------------------------------------------------------

int64_t decode_layer_scratch_size(const DecodeLayerShape& shape, int dtype) {
  return ScratchLayout(shape, element_size(dtype)).size;
}

void decode_layer(const DecodeLayerShape& sh, const DecodeLayerWeights& w, const DecodeLayerIO& io, int dtype,
                  int num_threads, int attention_threads) {
  check_shape(sh, num_threads, attention_threads);
  const int64_t needed = decode_layer_scratch_size(sh, dtype);
  FASTMM_CHECK(io.scratch_size >= needed, "decode_layer",
               "scratch holds " + std::to_string(io.scratch_size) + " bytes, needs " + std::to_string(needed));
  FASTMM_CHECK(reinterpret_cast<uintptr_t>(io.scratch) % 64 == 0, "decode_layer", "scratch must be 64-byte aligned");
  dispatch_dtype(dtype, [&](auto zero) {
    run_layer<decltype(zero)>(sh, w, io, dtype, num_threads, attention_threads);
  });
}

}  // namespace fastmm

namespace {

// decode_layer's buffers arrive as addresses (Python ints): its runner checks them once when it is built.
template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

FASTMM_ENTRY_POINTS(m) {
  m.def(
      "decode_layer_scratch_size",
      [](int64_t batch, int64_t tokens, int64_t hidden, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
         int64_t intermediate, int64_t cache_size, int dtype) {
        const fastmm::DecodeLayerShape shape{batch, tokens, hidden, q_heads, kv_heads, head_dim, intermediate,
                                             cache_size};
        return fastmm::decode_layer_scratch_size(shape, dtype);
      },
      pybind11::arg("batch"), pybind11::arg("tokens"), pybind11::arg("hidden"), pybind11::arg("q_heads"),
      pybind11::arg("kv_heads"), pybind11::arg("head_dim"), pybind11::arg("intermediate"), pybind11::arg("cache_size"),
      pybind11::arg("dtype"));

  // Per-call buffers first, then the layer's constants, so that a caller can keep the latter in one tuple.
  m.def(
      "decode_layer",
      [](uintptr_t x, uintptr_t residual, uintptr_t modality, uintptr_t positions, uintptr_t cache_lengths, uintptr_t x_out,
         uintptr_t residual_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t rope_cos, uintptr_t rope_sin,
         uintptr_t scratch, int64_t scratch_size, uintptr_t input_norm, double input_norm_eps, uintptr_t qkv,
         uintptr_t qkv_bias, uintptr_t o, uintptr_t o_bias, uintptr_t post_attention_norm,
         double post_attention_norm_eps, uintptr_t gate_up, uintptr_t gate_up_bias, uintptr_t down,
         uintptr_t down_bias, int64_t batch, int64_t tokens, int64_t hidden, int64_t q_heads, int64_t kv_heads,
         int64_t head_dim, int64_t intermediate, int64_t cache_size, int dtype, int num_threads,
         int attention_threads) {
        const fastmm::DecodeLayerShape shape{batch, tokens, hidden, q_heads, kv_heads, head_dim, intermediate,
                                             cache_size};
        const fastmm::DecodeLayerWeights weights{ptr<const void>(input_norm),
                                                 input_norm_eps,
                                                 ptr<const void>(qkv),
                                                 ptr<const void>(qkv_bias),
                                                 ptr<const void>(o),
                                                 ptr<const void>(o_bias),
                                                 ptr<const void>(post_attention_norm),
                                                 post_attention_norm_eps,
                                                 ptr<const void>(gate_up),
                                                 ptr<const void>(gate_up_bias),
                                                 ptr<const void>(down),
                                                 ptr<const void>(down_bias)};
        const fastmm::DecodeLayerIO io{ptr<const void>(x),
                                       ptr<const void>(residual),
                                       ptr<const int64_t>(modality),
                                       ptr<const int32_t>(positions),
                                       ptr<const int32_t>(cache_lengths),
                                       ptr<const float>(rope_cos),
                                       ptr<const float>(rope_sin),
                                       ptr<void>(k_cache),
                                       ptr<void>(v_cache),
                                       ptr<void>(x_out),
                                       ptr<void>(residual_out),
                                       ptr<void>(scratch),
                                       scratch_size};
        fastmm::decode_layer(shape, weights, io, dtype, num_threads, attention_threads);
      },
      pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("modality"), pybind11::arg("positions"), pybind11::arg("cache_lengths"), pybind11::arg("x_out"),
      pybind11::arg("residual_out"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("rope_cos"), pybind11::arg("rope_sin"),
      pybind11::arg("scratch"), pybind11::arg("scratch_size"), pybind11::arg("input_norm"),
      pybind11::arg("input_norm_eps"), pybind11::arg("qkv"), pybind11::arg("qkv_bias"), pybind11::arg("o"),
      pybind11::arg("o_bias"), pybind11::arg("post_attention_norm"), pybind11::arg("post_attention_norm_eps"),
      pybind11::arg("gate_up"), pybind11::arg("gate_up_bias"), pybind11::arg("down"), pybind11::arg("down_bias"),
      pybind11::arg("batch"), pybind11::arg("tokens"), pybind11::arg("hidden"), pybind11::arg("q_heads"),
      pybind11::arg("kv_heads"), pybind11::arg("head_dim"), pybind11::arg("intermediate"), pybind11::arg("cache_size"),
      pybind11::arg("dtype"), pybind11::arg("num_threads"), pybind11::arg("attention_threads"), fastmm::release());
}
