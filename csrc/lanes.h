// Native-width fp32 vectors for values that loops carry (accumulators, running sums).
//
// f32x16 (common.h) is one register only with AVX-512. Elsewhere GCC 12 keeps a 16-lane value that lives across
// loop iterations in memory and moves it through general registers at every update, which made the fusion
// family's depthwise pass several times slower on AVX2. Kernels therefore carry Lanes across iterations and use
// f32x16 only for per-element temporaries.
#pragma once

#include <cstdint>
#include <cstring>

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

}  // namespace fastmm
