// linear family: y = x W^T (+ b) for the few rows of x of a decode step (one per sequence, two with
// classifier-free guidance), where the product is one pass over the weights and memory bandwidth is the limit.
//
// A GEMM library blocks for large M and reads W at a fraction of the bandwidth here: MKL's sgemm on the AMD
// development host streams W at 2-15 GB/s for M = 1..8, while one pass of plain FMAs reaches DRAM speed.
//
// x is widened once into an fp32 buffer, zero-padded to whole 16-lane blocks (a few KiB: it stays in L1/L2).
// Threads split the weight rows into contiguous ranges, so each streams its own part of W in memory order.
// A tile of 8 weight rows x 2 rows of x keeps 16 accumulators of 16 fp32 lanes in registers, vectorized along
// K: each weight block loaded (and widened from fp16 / bf16) feeds 2 FMAs, each x block 8. Per tile, one
// horizontal sum per output. For M > 2, the tile's weight rows are read again for each further pair of rows of
// x, from L1 / L2: the pass that brings them from memory stays as light as at M = 2, so the memory stream
// keeps pace while the extra FMAs run on cached data.
//
// Measured on the 2-thread AMD EPYC development host (weights from DRAM and from L3, M = 1..16) against
// tiles of 4 x 4, 4 x 6, 8 x 4, 2 x 8 and 16 x 1, software prefetch 0.5-2 KiB ahead or of the next tile, and
// a transposed reduction of 16 accumulators at once: none was faster than 8 x 2 with hardware prefetch
// alone. At M = 1 and 2 it reaches DRAM bandwidth; from M = 8 on, the FMAs (M per weight element) limit it.
//
// Without AVX-512 (AVX2: 16 registers of 8 lanes) the 8 x 2 tile of f32x16 does not fit the register file:
// GCC moved every accumulator through memory and the kernel fell far behind F.linear at any M. There the tiles
// are 4 weight rows x up to 3 rows of x in 8-lane registers; on the AVX2 development host none of 4 x 2, 6 x 2,
// 8 x 1, 3 x 3, 3 x 4 and 2 x 4 was faster beyond run-to-run noise (`benchmarks/decode_kernels.py` times the
// kernel against F.linear). What did matter there: keeping each loaded block in a register (pin_in_register),
// one horizontal sum for 4 accumulators, and widening bf16 / fp16 weights once per tile from 8 rows of x.
//
// bf16 with AVX512_BF16: widening each weight block to fp32 held the kernel at 16-23 GB/s (2 threads, M = 2,
// weights from DRAM). vdpbf16ps instead multiplies 32 bf16 pairs of W and x exactly and adds them into 16 fp32
// lanes, so x stays bf16 and a 64-byte weight block costs one instruction per row of x. Its tiles read one
// weight row at a time, in memory order: with 8-row tiles it reached 18-27 GB/s, with one row 28-33 GB/s
// ([16384, 512] and [6144, 2048]). Sums come in another order (still fp32 accumulation) and bf16 subnormals,
// below 1.2e-38, count as zero (the instruction's DAZ).
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "lanes.h"
#include "linear.h"
#include "module.h"

namespace fastmm {
namespace {

// Rows of x in fp32, [rows][padded] with padded = dim rounded up to whole blocks and zeros past dim.
template <typename T>
std::vector<float> widen_rows(const T* x, int64_t stride, int64_t rows, int64_t dim, int64_t padded) {
  std::vector<float> out(rows * padded, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    const T* src = x + m * stride;
    float* dst = out.data() + m * padded;
    for_each_block(dim, [=](int64_t j, auto n) { store_block(dst + j, load_block(src + j, n), n); });
  }
  return out;
}

// What every tile reads and writes: the weight rows, the widened x, the bias and the output.
template <typename T, typename X = float>
struct Problem {
  const T* weight;
  int64_t weight_stride;
  const X* x;  // [rows][padded]: fp32 (bf16 pairs for the vdpbf16ps tiles)
  int64_t rows;
  int64_t dim;
  int64_t padded;
  const T* bias;  // or null
  T* y;           // [rows][out_features]
  int64_t out_features;
};

// y[m][n + r] for r < R and the MB rows of x from first_row: R weight rows against MB rows of x, each weight
// block loaded once for all MB rows. The last, partial block of a weight row loads zeros past dim, which meet
// the zero padding of x.
template <int R, int MB, typename T>
void tile(const Problem<T>& pb, int64_t n, int64_t first_row) {
  const T* w = pb.weight + n * pb.weight_stride;
  const float* x = pb.x + first_row * pb.padded;
  f32x16 acc[MB][R] = {};
  const auto accumulate = [&](int64_t j, auto count) {
    f32x16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_block(w + r * pb.weight_stride + j, count);
    for (int m = 0; m < MB; ++m) {
      const f32x16 xv = load_block(x + m * pb.padded + j, FullBlock{});
      for (int r = 0; r < R; ++r) acc[m][r] = fma_lanes(wv[r], xv, acc[m][r]);
    }
  };
  int64_t j = 0;
  for (; j + kBlock <= pb.dim; j += kBlock) accumulate(j, FullBlock{});
  if (j < pb.dim) accumulate(j, pb.dim - j);
  for (int m = 0; m < MB; ++m) {
    T* out = pb.y + (first_row + m) * pb.out_features + n;
    for (int r = 0; r < R; ++r) {
      out[r] = from_float<T>(reduce_sum(acc[m][r]) + (pb.bias ? to_float(pb.bias[n + r]) : 0.f));
    }
  }
}

#if defined(__AVX512BF16__)
constexpr int64_t kPairBlock = 32;  // bf16 values per vdpbf16ps operand

// Rows of x as bf16, [rows][padded] with padded = dim rounded up to whole 32-value blocks and zeros past dim.
std::vector<bf16> pad_rows(const bf16* x, int64_t stride, int64_t rows, int64_t dim, int64_t padded) {
  std::vector<bf16> out(rows * padded, bf16{0});
  for (int64_t m = 0; m < rows; ++m) std::copy(x + m * stride, x + m * stride + dim, out.data() + m * padded);
  return out;
}

// tile() for bf16 on vdpbf16ps, one weight row (R = 1; see the top of this file) against MB rows of x: each
// 32-value weight block feeds one dot-product instruction per row of x, into two accumulators per row taken
// in turn so that consecutive instructions do not wait on each other. The last, partial block loads zeros past
// dim (a masked load: nothing past the row is touched).
template <int R, int MB>
void tile(const Problem<bf16, bf16>& pb, int64_t n, int64_t first_row) {
  static_assert(R == 1, "the vdpbf16ps tiles read one weight row at a time");
  const bf16* w = pb.weight + n * pb.weight_stride;
  const bf16* x = pb.x + first_row * pb.padded;
  const auto x_block = [&](int m, int64_t j) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + m * pb.padded + j));
  };
  // Plain arrays indexed by unrolled constants, so that GCC keeps every accumulator in a register.
  __m512 even[MB], odd[MB];
  for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * kPairBlock <= pb.dim; j += 2 * kPairBlock) {
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + j));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + j + kPairBlock));
    for (int m = 0; m < MB; ++m) {
      even[m] = _mm512_dpbf16_ps(even[m], w0, x_block(m, j));
      odd[m] = _mm512_dpbf16_ps(odd[m], w1, x_block(m, j + kPairBlock));
    }
  }
  for (; j < pb.dim; j += kPairBlock) {
    const int64_t left = pb.dim - j;
    const __mmask32 lanes = left >= kPairBlock ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(lanes, w + j));
    for (int m = 0; m < MB; ++m) even[m] = _mm512_dpbf16_ps(even[m], wv, x_block(m, j));
  }
  for (int m = 0; m < MB; ++m) {
    const float sum = reduce_sum(_mm512_add_ps(even[m], odd[m]));
    pb.y[(first_row + m) * pb.out_features + n] = from_float<bf16>(sum + (pb.bias ? to_float(pb.bias[n]) : 0.f));
  }
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
// Narrow vectors (AVX2: 16 registers of 8 fp32 lanes). The f32x16 tile above needs 16 accumulators of two
// registers each there, so GCC keeps them in memory and moves every update through it. These tiles carry
// native-width Lanes instead, R weight rows x MB rows of x sized to the register file: MB x blocks and R x MB
// accumulators stay in registers while each weight block streams through one more.
// Makes v a register value the compiler cannot reload from memory. Without it GCC 12 folds the blocks of x or
// of W into the FMAs as memory operands, one load per FMA instead of one per block (15 loads for 12 FMAs in the
// 4 x 3 tile): the tile then waited on loads, not on FMAs.
inline void pin_in_register(Lanes& v) {
#if defined(__AVX__)
  __asm__("" : "+x"(v));
#else
  (void)v;
#endif
}

// out[r] = the sum of the lanes of acc[r]. Four vectors at once take two rounds of horizontal adds and one add
// of 128-bit halves instead of four separate reductions, which cost as much as a third of a tile's FMAs at
// K = 512.
template <int R>
void lane_sums(const Lanes (&acc)[R], float* out) {
#if defined(__AVX__)
  if constexpr (R == 4) {
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
    return;
  }
#endif
  for (int r = 0; r < R; ++r) out[r] = lanes_sum(acc[r]);
}

// y[m][n + r] for r < R and the MB rows of x from first_row, as tile() computes it, with weight row n + r read
// from w + r * w_stride: pb.weight's rows, or the same rows already widened to fp32 (W = float).
template <int R, int MB, typename T, typename W>
void narrow_tile(const Problem<T>& pb, int64_t n, int64_t first_row, const W* w, int64_t w_stride) {
  const float* x = pb.x + first_row * pb.padded;
  Lanes acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = Lanes{};
  const auto accumulate = [&](int64_t j, auto load) {
    Lanes xv[MB];
    for (int m = 0; m < MB; ++m) {
      xv[m] = load_lanes(x + m * pb.padded + j);
      pin_in_register(xv[m]);
    }
    for (int r = 0; r < R; ++r) {
      Lanes wv = load(w + r * w_stride + j);
      pin_in_register(wv);
      for (int m = 0; m < MB; ++m) acc[m][r] = fma_lanes(wv, xv[m], acc[m][r]);
    }
  };
  const int64_t full = pb.dim / kLanes * kLanes;
  for (int64_t j = 0; j < full; j += kLanes) accumulate(j, [](const W* p) { return load_lanes(p); });
  if (full < pb.dim) accumulate(full, [&](const W* p) { return load_lanes(p, pb.dim - full); });
  for (int m = 0; m < MB; ++m) {
    float sums[R];
    lane_sums(acc[m], sums);
    T* out = pb.y + (first_row + m) * pb.out_features + n;
    for (int r = 0; r < R; ++r) out[r] = from_float<T>(sums[r] + (pb.bias ? to_float(pb.bias[n + r]) : 0.f));
  }
}
#endif

// R weight rows from n against every row of x: pairs of rows, then the last row when M is odd (narrow
// vectors: triples, then a pair or a single row).
template <int R, typename T, typename X>
void weight_tile(const Problem<T, X>& pb, int64_t n) {
  int64_t m = 0;
#if !(defined(__AVX512F__) && defined(__AVX512BW__))
  if constexpr (std::is_same_v<X, float>) {
    const auto passes = [&](const auto* w, int64_t w_stride) {
      // Triples, then a pair or a single row; 3k + 1 rows (k >= 1) end with two pairs instead of a triple and a
      // single row, whose pass would load R + 1 blocks per R FMAs.
      const int64_t triples = pb.rows % 3 == 1 && pb.rows > 1 ? pb.rows / 3 - 1 : pb.rows / 3;
      for (; m < 3 * triples; m += 3) narrow_tile<R, 3>(pb, n, m, w, w_stride);
      for (; m + 2 <= pb.rows; m += 2) narrow_tile<R, 2>(pb, n, m, w, w_stride);
      if (m < pb.rows) narrow_tile<R, 1>(pb, n, m, w, w_stride);
    };
    // From 8 rows of x (3 passes over the tile's weight rows), fp16 / bf16 weights are widened once into an
    // L1-resident buffer: widening in every pass costs two more instructions per weight block beside its 3
    // FMAs. With fewer passes the widening did not pay for itself.
    if (std::is_same_v<T, float> || pb.rows < 8) return passes(pb.weight + n * pb.weight_stride, pb.weight_stride);
    thread_local std::vector<float> wide;
    wide.resize(R * pb.padded);
    for (int r = 0; r < R; ++r) {
      const T* src = pb.weight + (n + r) * pb.weight_stride;
      float* dst = wide.data() + r * pb.padded;
      for_each_block(pb.dim, [=](int64_t j, auto count) { store_block(dst + j, load_block(src + j, count), count); });
    }
    return passes(static_cast<const float*>(wide.data()), pb.padded);
  }
#endif
  if constexpr (std::is_same_v<X, bf16>) {  // one weight row per tile: more rows of x per pass
    for (; m + 4 <= pb.rows; m += 4) tile<R, 4>(pb, n, m);
  }
  for (; m + 2 <= pb.rows; m += 2) tile<R, 2>(pb, n, m);
  if (m < pb.rows) tile<R, 1>(pb, n, m);
}

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
constexpr int kTileWeightRows = 4;  // R of the narrow tiles: with MB <= 3, 12 accumulators + 3 x + 1 weight block
#else
constexpr int kTileWeightRows = 8;  // R of the tiles (see the top of this file)
#endif

// Bytes of weights below which one more thread costs more to wake and join than it saves: about 5 us of one
// core streaming from L2 / L3.
constexpr int64_t kMinWeightBytesPerThread = 1 << 17;

// Tiles of kTileWeightRows weight rows, split among the threads in contiguous ranges; the last out_features %
// kTileWeightRows rows one at a time.
template <typename T, typename X>
void run(const Problem<T, X>& pb, int num_threads) {
  constexpr int R = std::is_same_v<X, bf16> ? 1 : kTileWeightRows;  // bf16 pairs: one row at a time
  const int64_t bytes = pb.out_features * pb.dim * static_cast<int64_t>(sizeof(T));
  const int threads = static_cast<int>(std::clamp<int64_t>(bytes / kMinWeightBytesPerThread, 1, num_threads));
  const int64_t tiles = (pb.out_features + R - 1) / R;
  parallel_for(tiles, threads, [&](int64_t begin, int64_t end, int) {
    const int64_t last = std::min(end * R, pb.out_features);
    int64_t n = begin * R;
    for (; n + R <= last; n += R) weight_tile<R>(pb, n);
    for (; n < last; ++n) weight_tile<1>(pb, n);
  });
}

}  // namespace

// ---- the kernel, and its entry point (registered at the bottom of this file) ----------------------------------------

void skinny_linear(const void* x, int64_t x_row_stride, const void* weight, int64_t weight_row_stride,
                   const void* bias, void* y, int64_t rows, int64_t in_features, int64_t out_features, int dtype,
                   int num_threads) {
  FASTMM_CHECK(rows >= 0 && in_features >= 0 && out_features >= 0, __func__,
               "rows, in_features and out_features must be >= 0, got " + std::to_string(rows) + ", " +
                   std::to_string(in_features) + " and " + std::to_string(out_features));
  FASTMM_CHECK(x_row_stride >= 0 && weight_row_stride >= 0, __func__, "row strides must be >= 0");
  FASTMM_CHECK(num_threads >= 1, __func__, "num_threads must be >= 1, got " + std::to_string(num_threads));
  if (rows == 0 || out_features == 0) return;
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
      const int64_t padded = (in_features + kPairBlock - 1) / kPairBlock * kPairBlock;
      const std::vector<bf16> pairs = pad_rows(static_cast<const bf16*>(x), x_row_stride, rows, in_features, padded);
      const Problem<bf16, bf16> pb{static_cast<const bf16*>(weight), weight_row_stride, pairs.data(), rows,
                                   in_features, padded, static_cast<const bf16*>(bias), static_cast<bf16*>(y),
                                   out_features};
      return run(pb, num_threads);
    }
#endif
    const int64_t padded = (in_features + kBlock - 1) / kBlock * kBlock;
    const std::vector<float> wide = widen_rows(static_cast<const T*>(x), x_row_stride, rows, in_features, padded);
    const Problem<T> pb{static_cast<const T*>(weight), weight_row_stride, wide.data(), rows, in_features, padded,
                        static_cast<const T*>(bias), static_cast<T*>(y), out_features};
    run(pb, num_threads);
  });
}

namespace entry {

void skinny_linear(const TensorArg& x, const TensorArg& weight, const TensorArg& bias, const TensorArg& y,
                   int num_threads) {
  constexpr const char* kKernel = "linear";
  check(x, kKernel, "x", rows_of(kFloats, {kAny, kAny}));
  const int64_t M = x.sizes[0], K = x.sizes[1];
  check(weight, kKernel, "weight", rows_of(x.dtype, {kAny, K}));
  const int64_t N = weight.sizes[0];
  check(bias, kKernel, "bias", contiguous(x.dtype, {N}).or_none());
  check(y, kKernel, "y", contiguous(x.dtype, {M, N}));
  if (M == 0 || N == 0) return;
  fastmm::skinny_linear(x.data, x.strides[0], weight.data, weight.strides[0], bias.data, y.data, M, K, N,
                        static_cast<int>(x.dtype), num_threads);
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) { m.def("skinny_linear", &fastmm::entry::skinny_linear, fastmm::release()); }
