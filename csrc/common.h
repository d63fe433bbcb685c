// Shared pieces of the fastmm C++ kernels: dtype codes, fp16/bf16 <-> fp32 conversion, argument checks and
// the OpenMP row loop. Kernels take raw pointers and sizes; the entry points (module.h) check the
// tensors they receive first (tensor_arg.h).
#pragma once

#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastmm {

// Element type codes. The first three are the kernels' float types, as fastmm/native/decode_layer.py passes
// them; the others are what ids, lengths and masks hold (tensor_arg.h), and kOther any dtype no kernel takes.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt64, kInt32, kBool, kOther };

// Throws std::invalid_argument (ValueError in Python) "<where>: <msg>" unless cond holds; where names the
// entry point the caller called, msg the argument and what was expected.
#define FASTMM_CHECK(cond, where, msg)                                                           \
  do {                                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string(where) + ": " + (msg));                 \
  } while (0)

// 16-bit storage types, bit-compatible with torch.bfloat16 / torch.float16. Structs, not bare uint16_t, so
// overloads cannot mix them up with integers or with each other. The scalar conversions below serve partial
// blocks and builds without AVX-512; full blocks convert in registers (load_block / store_block).
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint32_t float_to_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

inline float to_float(float v) { return v; }

// bf16 is the upper half of an fp32.
inline float to_float(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

// Exact. Normal, inf and nan: shift exponent and mantissa into fp32 position with the exponent rebiased by
// +224 (so fp16's 31 lands on fp32's 255), then scale by 2^-112 (inf and nan stay as they are).
// Subnormal: put the 10 mantissa bits under the exponent of 0.5, which makes 0.5 + m * 2^-24, and
// subtract 0.5. No intermediate is an fp32 subnormal, so flush-to-zero modes cannot change the result.
inline float to_float(fp16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp_mant = v.bits & 0x7fffu;
  const float normal = bits_to_float((exp_mant << 13) + (224u << 23)) * 0x1p-112f;
  const float subnormal = bits_to_float(0x3f000000u | exp_mant) - 0.5f;
  return bits_to_float(sign | float_to_bits(exp_mant < 0x0400u ? subnormal : normal));
}

template <typename T>
T from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

// Round to nearest even, like torch's .bfloat16(): add 0x7fff plus the lowest kept bit, then truncate.
// NaN would carry into the exponent that way, so it maps to a quiet NaN instead.
template <>
inline bf16 from_float<bf16>(float v) {
  const uint32_t bits = float_to_bits(v);
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return bf16{static_cast<uint16_t>(is_nan ? ((bits >> 16) | 0x40u) : (rounded >> 16))};
}

// Round to nearest even, like torch's .half(). By range of |v|:
//   >= 2^16 (or inf, nan): inf, or a quiet nan;
//   <  2^-14 (fp16 subnormal or zero): |v| + 0.5 has an ulp of 2^-24, fp16's subnormal step, so the fp32
//      add rounds to the fp16 mantissa (nearest even) and leaves it in the low bits;
//   otherwise: rebias the exponent and round the 23-bit mantissa to 10 bits by adding 0xfff plus the
//      lowest kept bit; a carry out of the mantissa correctly bumps the exponent (up to inf).
template <>
inline fp16 from_float<fp16>(float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  const uint32_t special = abs_bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t subnormal = float_to_bits(bits_to_float(abs_bits) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (abs_bits - (112u << 23) + 0xfffu + ((abs_bits >> 13) & 1u)) >> 13;
  const uint32_t out = abs_bits >= 0x47800000u ? special : abs_bits < 0x38800000u ? subnormal : normal;
  return fp16{static_cast<uint16_t>(sign | out)};
}

// ---- blocks of 16 fp32 lanes ----------------------------------------------------------------------------
// Row kernels work on blocks of kBlock values held as fp32 in a GCC vector: plain arithmetic operators, one
// zmm register with AVX-512, split by the compiler on narrower targets. load_block widens from T and
// store_block rounds to T in registers, so every value is converted once and math never leaves registers.
// (Scalar to_float / from_float inside auto-vectorized loops cost ~20 instructions per 16 values for the
// 16-bit types, and GCC 12 cannot vectorize _Float16 at all.) A full block is tagged FullBlock; the last,
// partial block of a row passes its length n instead and takes the scalar path (lanes >= n read as 0).

// Passing these vectors by value between functions has a different ABI with and without AVX-512; GCC warns
// about that in portable builds. Nothing here crosses the module boundary, so the warning is noise.
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int64_t kBlock = 16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// v in every lane, and a * b + c per lane rounded once: vfmadd with AVX-512, std::fma lane by lane without.
#if defined(__AVX512F__) && defined(__AVX512BW__)
inline f32x16 splat(float v) { return _mm512_set1_ps(v); }
inline f32x16 fma_lanes(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
#else
inline f32x16 splat(float v) { return f32x16{} + v; }
inline f32x16 fma_lanes(f32x16 a, f32x16 b, f32x16 c) {
  for (int i = 0; i < kBlock; ++i) c[i] = std::fma(a[i], b[i], c[i]);
  return c;
}
#endif

struct FullBlock {};

template <typename T>
f32x16 load_block(const T* p, int64_t n) {
  f32x16 v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}

template <typename T>
void store_block(T* p, f32x16 v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = from_float<T>(v[i]);
}

inline f32x16 load_block(const float* p, FullBlock) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_block(float* p, f32x16 v, FullBlock) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Intrinsics where GCC's own lowering of the vector code below is poor (it splits the widening into 256-bit
// halves and narrows with a permute) or impossible (fp16). GCC 12's intrinsic headers trip
// -Wmaybe-uninitialized on their own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

inline f32x16 load_block(const bf16* p, FullBlock) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// from_float<bf16> on 16 lanes, bit for bit.
inline void store_block_exact(bf16* p, f32x16 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lowest_kept));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

#if defined(__AVX512BF16__)
// vcvtneps2bf16 rounds like from_float<bf16> (nearest even, NaN quieted the same way) in one instruction,
// but flushes fp32 subnormals to zero; the rare block holding one takes the exact path.
inline void store_block(bf16* p, f32x16 v, FullBlock) {
  const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
  const __m512i below_normal = _mm512_sub_epi32(magnitude, _mm512_set1_epi32(1));  // 0 wraps to 0xffffffff
  if (_mm512_cmplt_epu32_mask(below_normal, _mm512_set1_epi32(0x007fffff))) return store_block_exact(p, v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#else
inline void store_block(bf16* p, f32x16 v, FullBlock) { store_block_exact(p, v); }
#endif

inline f32x16 load_block(const fp16* p, FullBlock) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // exact
}

inline void store_block(fp16* p, f32x16 v, FullBlock) {
  // Round to nearest even, like from_float<fp16>.
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

#pragma GCC diagnostic pop
#else
inline f32x16 load_block(const bf16* p, FullBlock) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<f32x16>(__builtin_convertvector(h, u32x16) << 16);
}

// from_float<bf16> on 16 lanes.
inline void store_block(bf16* p, f32x16 v, FullBlock) {
  const u32x16 bits = reinterpret_cast<u32x16>(v);
  const u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const u32x16 quiet_nan = (bits >> 16) | 0x40u;
  const u16x16 h = __builtin_convertvector(v == v ? rounded : quiet_nan, u16x16);  // v != v only for NaN
  std::memcpy(p, &h, sizeof(h));
}

// No vector fp16 conversion without AVX-512 (F16C would do, but is not worth a third path): scalar lanes.
inline f32x16 load_block(const fp16* p, FullBlock) { return load_block(p, kBlock); }
inline void store_block(fp16* p, f32x16 v, FullBlock) { store_block(p, v, kBlock); }
#endif

// v with lanes >= n set to 0: keeps a partial block's padding out of sums.
inline f32x16 first_lanes(f32x16 v, int64_t n) {
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < static_cast<int32_t>(n) ? v : f32x16{};
}

// The sum of v's 16 lanes, lane 0 first: a fixed order, for results that must not depend on the build.
inline float lane_sum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < kBlock; ++i) s += v[i];
  return s;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// GCC 12's intrinsic headers trip -W(maybe-)uninitialized on their own _mm256_undefined_pd (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// The sum of v's 16 lanes in any order (a tree on AVX-512): within fp32 accumulation error of lane_sum.
inline float reduce_sum(f32x16 v) { return _mm512_reduce_add_ps(v); }
// The largest of v's lanes. For NaN-free lanes: callers accumulate their maxima with comparisons, which
// never let a NaN in (max is exact, so the order of the reduction does not matter).
inline float lane_max(f32x16 v) { return _mm512_reduce_max_ps(v); }
#pragma GCC diagnostic pop
#else
inline float reduce_sum(f32x16 v) { return lane_sum(v); }
inline float lane_max(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < kBlock; ++i) m = std::max(m, v[i]);
  return m;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// e^x within about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2 (Cody and Waite), e^r by Cephes' expf polynomial,
// times 2^n by vscalefps. Below -104 every result is 0 (which also turns -inf into 0); NaN stays NaN.
inline f32x16 exp_lanes(f32x16 x) {
  x = _mm512_max_ps(splat(-104.f), x);
  const f32x16 n = _mm512_roundscale_ps(x * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const f32x16 r = fma_lanes(n, splat(2.12194440e-4f), fma_lanes(n, splat(-0.693359375f), x));
  f32x16 p = splat(1.9875691500e-4f);
  p = fma_lanes(p, r, splat(1.3981999507e-3f));
  p = fma_lanes(p, r, splat(8.3334519073e-3f));
  p = fma_lanes(p, r, splat(4.1665795894e-2f));
  p = fma_lanes(p, r, splat(1.6666665459e-1f));
  p = fma_lanes(p, r, splat(5.0000001201e-1f));
  p = fma_lanes(p, r * r, r) + 1.f;
  return _mm512_scalef_ps(p, n);
}
#pragma GCC diagnostic pop
#else
inline f32x16 exp_lanes(f32x16 x) {
  for (int l = 0; l < kBlock; ++l) x[l] = std::exp(x[l]);
  return x;
}
#endif

// Calls body(j, n) for the blocks of a row of dim values: n is FullBlock{} for whole blocks, then the length
// of the last partial block, if any. body is taken by value: the intrinsic stores may alias anything
// (__m256i_u is may_alias), so a body living in the caller's memory would be reloaded after every store.
template <typename Body>
void for_each_block(int64_t dim, Body body) {
  int64_t j = 0;
  for (; j + kBlock <= dim; j += kBlock) body(j, FullBlock{});
  if (j < dim) body(j, dim - j);
}

// Sum over a row of term(j, n), a block of terms, in fp32. Four accumulators: an add waits for the previous
// add into the same register (4 cycles), and one chain would make the statistics pass slower than memory.
template <typename Term>
float sum_blocks(int64_t dim, Term term) {
  f32x16 acc[4] = {};
  int64_t j = 0;
  for (; j + 4 * kBlock <= dim; j += 4 * kBlock) {
    for (int k = 0; k < 4; ++k) acc[k] += term(j + k * kBlock, FullBlock{});
  }
  for (; j + kBlock <= dim; j += kBlock) acc[0] += term(j, FullBlock{});
  if (j < dim) acc[1] += first_lanes(term(j, dim - j), dim - j);
  return lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Calls f with a value of the element type named by `dtype`: f(float{}), f(fp16{}) or f(bf16{}).
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kFloat16:
      f(fp16{});
      return;
    case DType::kBFloat16:
      f(bf16{});
      return;
    default:
      break;
  }
  throw std::invalid_argument("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                              std::to_string(dtype));
}

// Threads worth starting for n independent rows: at most one per row, at least one.
inline int team_size(int64_t n, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, num_threads)));
}

// Runs body(begin, end, thread) over [0, n) split into team_size(n, num_threads) contiguous chunks, one per
// OpenMP thread (the split of schedule(static)); thread is in [0, team_size) so callers can own per-thread
// buffers. A single chunk runs on the calling thread without entering a parallel region.
template <typename F>
void parallel_for(int64_t n, int num_threads, F&& body) {
  const int team = team_size(n, num_threads);
  if (team == 1) {
    body(int64_t{0}, n, 0);
    return;
  }
#pragma omp parallel num_threads(team)
  {
    const int64_t thread = omp_get_thread_num();
    const int64_t threads = omp_get_num_threads();
    body(n * thread / threads, n * (thread + 1) / threads, static_cast<int>(thread));
  }
}

}  // namespace fastmm
