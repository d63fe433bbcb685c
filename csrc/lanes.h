// Native-width fp32 vectors for values that loops carry (accumulators, running sums).
//
// f32x16 (common.h) is one register only with AVX-512. Elsewhere GCC 12 keeps a 16-lane value that lives across
// loop iterations in memory and moves it through general registers at every update, which made the fusion
// family's depthwise pass several times slower on AVX2. Kernels therefore carry Lanes across iterations and use
// f32x16 only for per-element temporaries.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"  // immintrin.h, bf16, fp16, to_float

namespace fastmm {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Lanes is f32x16 here: common.h's fma_lanes and load_block serve.
inline Lanes load_lanes(const bf16* p) { return load_block(p, FullBlock{}); }
inline Lanes load_lanes(const fp16* p) { return load_block(p, FullBlock{}); }
#else
// a * b + c per lane, rounded once.
inline Lanes fma_lanes(Lanes a, Lanes b, Lanes c) {
#if defined(__FMA__) && defined(__AVX__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// kLanes values from p, widened to fp32.
inline Lanes load_lanes(const bf16* p) {
  typedef uint16_t u16xL __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t u32xL __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  u16xL h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<Lanes>(__builtin_convertvector(h, u32xL) << 16);
}
inline Lanes load_lanes(const fp16* p) {
#if defined(__F16C__) && defined(__AVX__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  Lanes v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}
#endif

// count < kLanes values from p widened to fp32, the rest 0: nothing past p + count is read.
template <typename T>
Lanes load_lanes(const T* p, int64_t count) {
  Lanes v = {};
  for (int64_t i = 0; i < count; ++i) v[i] = to_float(p[i]);
  return v;
}

// The sum of v's lanes, lane 0 first.
inline float lanes_sum(Lanes v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace fastmm
